"""The payment-provider interface used by ``auto_top_up`` and the reconciler."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timedelta

from tasks.errors import ProviderRejected

__all__ = ["ChargeLookup", "ChargeResult", "PaymentProvider", "ProviderCharge"]


@dataclass(frozen=True)
class ChargeResult:
    """The provider's answer to a charge.

    Attributes:
      succeeded: True when the money was taken.
      charge_id: The provider's id of the charge (also for a decline, when it has one).
      decline_code: Why the charge was declined (``card_declined``...), else None.
      processing: The provider accepted the charge but has no result yet
        (Stripe ``processing``: normal for bank debits, for days); the
        reconciler looks it up later.
    """

    succeeded: bool
    charge_id: str | None
    decline_code: str | None = None
    processing: bool = False

    @property
    def state(self) -> str:
        """``succeeded``, ``processing`` or ``declined`` (the states :func:`db.money.finish_top_up` records)."""
        if self.succeeded:
            return "succeeded"
        return "processing" if self.processing else "declined"


@dataclass(frozen=True)
class ChargeLookup:
    """What the provider knows of a charge made under one of our idempotency keys (reconciliation).

    Attributes:
      state: ``succeeded``, ``declined``, ``processing``, ``failed`` (the
        provider has it and it ended without money: canceled, refused), or
        ``not_found`` (the provider has no charge under that key).
      charge_id: The provider's id, when found.
      decline_code: Why it was declined or failed, when it says.
    """

    state: str
    charge_id: str | None = None
    decline_code: str | None = None


@dataclass(frozen=True)
class ProviderCharge:
    """One charge as the provider lists it (``billing reconcile``).

    Attributes:
      idempotency_key: Our provider idempotency key it was made under (None: not one of ours).
      charge_id: The provider's id.
      amount_micros: Amount in micro-units of ``currency``.
      currency: ISO 4217 code, upper case.
      state: As in :class:`ChargeLookup`.
      created_at: When the provider created it (UTC).
    """

    idempotency_key: str | None
    charge_id: str
    amount_micros: int
    currency: str
    state: str
    created_at: datetime


class PaymentProvider(ABC):
    """Charges a stored payment method, honouring an idempotency key, and answers lookups of past charges.

    Implementations must make a repeated call with the same
    ``idempotency_key`` return the first call's result without charging
    again (Stripe's ``Idempotency-Key`` header semantics) for at least
    :attr:`key_window`.
    """

    name: str = "provider"
    #: How long the provider honours an idempotency key (Stripe docs,
    #: "Idempotent requests": keys are pruned after 24 hours).  A charge is
    #: never sent under a key older than this: the reconciler looks it up instead.
    key_window: timedelta = timedelta(hours=24)
    #: How long after the last charge request a lookup that finds nothing is
    #: trusted as "never charged" (a provider whose search lags needs longer).
    lookup_settle_delay: timedelta = timedelta(0)

    @abstractmethod
    async def charge(
        self, *, amount_micros: int, currency: str, payment_method_ref: str, idempotency_key: str
    ) -> ChargeResult:
        """Charge ``amount_micros`` (micro-units of ``currency``) to ``payment_method_ref``.

        Returns:
          ChargeResult: Succeeded, declined (a decline is an answer, not an
          error), or processing.

        Raises:
          ProviderTimeout: No answer in time; the charge may have happened.
          ProviderError: Any other transient failure; retry with the same key.
          ProviderRejected: The provider refused the request itself (nothing was charged).
        """

    @abstractmethod
    async def lookup(self, *, idempotency_key: str, charge_id: str | None) -> ChargeLookup:
        """What became of the charge made under ``idempotency_key`` (our provider key), if any.

        Parameters:
          idempotency_key: The provider idempotency key of our attempt.
          charge_id: The provider's id of the charge, when we stored one (faster, exact).

        Raises:
          ProviderTimeout, ProviderError: The provider could not answer (ask again later).
        """

    @classmethod
    def check_amount(cls, amount_micros: int, currency: str) -> None:
        """Refuse a top-up amount this provider could never charge in ``currency``.

        Called where an account's ``auto_top_up_amount_micros`` is set
        (``billing account create`` / ``account auto-top-up``), so a bad
        amount is refused then, not at charge time.  A class method: it
        needs neither credentials nor a connection.  This default accepts
        any positive amount (the fake provider keeps it).

        Parameters:
          amount_micros: The amount, in micro-units of ``currency``.
          currency: ISO 4217 code, any case.

        Raises:
          ProviderRejected: The provider cannot charge that amount (bad input, not retried).
        """
        if amount_micros <= 0:
            raise ProviderRejected(f"{cls.name}: amount must be > 0 micros, got {amount_micros}")

    async def list_charges(self, *, since: datetime, until: datetime) -> list[ProviderCharge]:
        """The provider's charges created in ``[since, until)`` (UTC), for ``billing reconcile``.

        Raises:
          NotImplementedError: The provider cannot list its charges.
        """
        raise NotImplementedError(f"the {self.name} provider cannot list its charges")

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
