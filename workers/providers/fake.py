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
anything else                    succeeds
================================ ============================================
"""

from __future__ import annotations

import asyncio
import random
import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import transaction
from tasks.errors import ProviderError, ProviderTimeout

from .base import ChargeResult, PaymentProvider

__all__ = ["FakePaymentProvider"]

_CHARGE = text(
    """
    INSERT INTO fake_provider_charges AS c (idempotency_key, charge_id, payment_method_ref, amount_micros, currency,
        status, decline_code)
    VALUES (:key, :charge_id, :payment_method_ref, :amount_micros, :currency, :status, :decline_code)
    ON CONFLICT (idempotency_key) DO UPDATE SET calls = c.calls + 1
    RETURNING charge_id, status, decline_code, amount_micros, calls
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
    ) -> None:
        self.engine = engine
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
        declined = payment_method_ref.startswith("pm_decline") or self._random.random() < self.decline_rate
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
                            "status": "declined" if declined else "succeeded",
                            "decline_code": "card_declined" if declined else None,
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
        if first_call and timeout:
            raise ProviderTimeout("fake provider: simulated timeout after charging")
        return ChargeResult(
            succeeded=row["status"] == "succeeded",
            charge_id=row["charge_id"],
            decline_code=row["decline_code"],
        )
