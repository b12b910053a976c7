"""FakePaymentProvider: a first-class provider for tests, demos and chaos runs.

It keeps its charges in its own table (``fake_provider_charges``, the
provider's side of the world), honours the idempotency key it is given, and
can be told to misbehave, deterministically by payment method or at random
by rate:

================================ ============================================
payment_method_ref starts with   behaviour
================================ ============================================
``pm_decline``                   declined (``card_declined``)
``pm_timeout_after_charge``      charges, then times out on the first call
``pm_error``                     fails before charging (``ProviderError``)
``pm_never_answers``             never answers a charge (``ProviderTimeout``)
                                 and never charges; a lookup finds nothing
``pm_silent_charge``             charges, then never answers a charge call
                                 (``ProviderTimeout``); a lookup finds it
``pm_processing_fail``           takes the charge as ``processing``; a lookup
                                 after ``processing_ms`` finds it failed
``pm_processing``                takes the charge as ``processing``; a lookup
                                 after ``processing_ms`` finds it succeeded
anything else                    succeeds
================================ ============================================

Lookups (:meth:`FakePaymentProvider.lookup`) read the same table, so the
reconciler sees exactly what the provider did.  Time comes from ``clock``
(tests inject theirs).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import transaction
from tasks.errors import ProviderError, ProviderTimeout

from ..clock import Clock, SystemClock
from .base import ChargeLookup, ChargeResult, PaymentProvider, ProviderCharge

__all__ = ["FakePaymentProvider"]

_CHARGE = text(
    """
    INSERT INTO fake_provider_charges AS c (idempotency_key, charge_id, payment_method_ref, amount_micros, currency,
        status, decline_code, settles_as, settles_at, created_at)
    VALUES (:key, :charge_id, :payment_method_ref, :amount_micros, :currency, :status, :decline_code,
        :settles_as, :settles_at, :now)
    ON CONFLICT (idempotency_key) DO UPDATE SET calls = c.calls + 1
    RETURNING charge_id, status, decline_code, amount_micros, calls
    """
)
# a processing charge settles when it is looked at after its time
_SETTLE = text(
    """
    UPDATE fake_provider_charges SET status = settles_as,
        decline_code = CASE WHEN settles_as = 'failed' THEN 'payment_failed' ELSE decline_code END
    WHERE idempotency_key = :key AND status = 'processing' AND settles_at <= :now
    """
)
_LOOKUP = text(
    "SELECT charge_id, status, decline_code FROM fake_provider_charges WHERE idempotency_key = :key"
)
_LIST = text(
    """
    SELECT idempotency_key, charge_id, amount_micros, currency, status, created_at FROM fake_provider_charges
    WHERE created_at >= :since AND created_at < :until ORDER BY created_at
    """
)


class FakePaymentProvider(PaymentProvider):
    """A payment provider that stores charges in PostgreSQL and honours idempotency keys.

    Parameters:
      engine: Engine of the database holding ``fake_provider_charges``.
      decline_rate, error_rate, timeout_rate: Probabilities (0..1) of a
        decline, an error before charging, and a timeout after charging.
      latency_ms: Simulated network latency per call, in milliseconds.
      seed: Seed of the random outcomes (None: nondeterministic).
      processing_ms: How long a ``pm_processing*`` charge stays processing, in milliseconds.
      clock: Source of "now" (UTC) for charge times and settlements.
    """

    name = "fake"

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        decline_rate: float = 0.0,
        error_rate: float = 0.0,
        timeout_rate: float = 0.0,
        latency_ms: int = 0,
        seed: int | None = None,
        processing_ms: int = 2 * 86_400_000,
        clock: Clock | None = None,
    ) -> None:
        self.engine = engine
        self.processing = timedelta(milliseconds=processing_ms)
        self.clock: Clock = clock or SystemClock()
        self.decline_rate = decline_rate
        self.error_rate = error_rate
        self.timeout_rate = timeout_rate
        self.latency_ms = latency_ms
        self._random = random.Random(seed)

    async def charge(
        self, *, amount_micros: int, currency: str, payment_method_ref: str, idempotency_key: str
    ) -> ChargeResult:
        """See :meth:`PaymentProvider.charge`."""
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        roll = self._random.random()
        if payment_method_ref.startswith("pm_error") or roll < self.error_rate:
            raise ProviderError("fake provider: simulated error before charging")
        if payment_method_ref.startswith("pm_never_answers"):
            raise ProviderTimeout("fake provider: simulated provider that never answers")
        declined = payment_method_ref.startswith("pm_decline") or self._random.random() < self.decline_rate
        processing = payment_method_ref.startswith("pm_processing")
        now = self.clock.now()
        async with transaction(self.engine) as conn:
            row = (
                (
                    await conn.execute(
                        _CHARGE,
                        {
                            "key": idempotency_key,
                            "charge_id": "ch_fake_" + uuid.uuid4().hex,
                            "payment_method_ref": payment_method_ref,
                            "amount_micros": amount_micros,
                            "currency": currency,
                            "status": "declined" if declined else "processing" if processing else "succeeded",
                            "decline_code": "card_declined" if declined else None,
                            "settles_as": (
                                (
                                    "failed"
                                    if payment_method_ref.startswith("pm_processing_fail")
                                    else "succeeded"
                                )
                                if processing and not declined
                                else None
                            ),
                            "settles_at": now + self.processing if processing and not declined else None,
                            "now": now,
                        },
                    )
                )
                .mappings()
                .one()
            )
        if int(row["amount_micros"]) != amount_micros:
            raise ProviderError("fake provider: idempotency key reused with a different amount")
        first_call = row["calls"] == 1
        timeout = (
            payment_method_ref.startswith("pm_timeout_after_charge")
            or self._random.random() < self.timeout_rate
        )
        if (first_call and timeout) or payment_method_ref.startswith("pm_silent_charge"):
            raise ProviderTimeout("fake provider: simulated timeout after charging")
        return ChargeResult(
            succeeded=row["status"] == "succeeded",
            charge_id=row["charge_id"],
            decline_code=row["decline_code"],
            processing=row["status"] == "processing",
        )

    async def lookup(self, *, idempotency_key: str, charge_id: str | None) -> ChargeLookup:
        """See :meth:`PaymentProvider.lookup`: this provider's own row for the key (settled if its time has come)."""
        async with transaction(self.engine) as conn:
            await conn.execute(_SETTLE, {"key": idempotency_key, "now": self.clock.now()})
            row = (await conn.execute(_LOOKUP, {"key": idempotency_key})).mappings().one_or_none()
        if row is None:
            return ChargeLookup("not_found")
        return ChargeLookup(row["status"], row["charge_id"], row["decline_code"])

    async def list_charges(self, *, since: datetime, until: datetime) -> list[ProviderCharge]:
        """See :meth:`PaymentProvider.list_charges`: the rows of ``fake_provider_charges`` created in the window."""
        async with transaction(self.engine) as conn:
            rows = (await conn.execute(_LIST, {"since": since, "until": until})).mappings().all()
        return [
            ProviderCharge(
                idempotency_key=r["idempotency_key"],
                charge_id=r["charge_id"],
                amount_micros=int(r["amount_micros"]),
                currency=r["currency"].strip(),
                state=r["status"],
                created_at=r["created_at"],
            )
            for r in rows
        ]
