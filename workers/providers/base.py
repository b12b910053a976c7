"""The payment-provider interface used by ``auto_top_up``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = ["ChargeResult", "PaymentProvider"]


@dataclass(frozen=True)
class ChargeResult:
    """The provider's final answer to a charge.

    Attributes:
      succeeded: True when the money was taken.
      charge_id: The provider's id of the charge (also for a decline, when it has one).
      decline_code: Why the charge was declined (``card_declined``...), else None.
    """

    succeeded: bool
    charge_id: str | None
    decline_code: str | None = None


class PaymentProvider(ABC):
    """Charges a stored payment method, honouring an idempotency key.

    Implementations must make a repeated call with the same
    ``idempotency_key`` return the first call's result without charging
    again (Stripe's ``Idempotency-Key`` header semantics).
    """

    name: str = "provider"

    @abstractmethod
    async def charge(
        self, *, amount_micros: int, currency: str, payment_method_ref: str, idempotency_key: str
    ) -> ChargeResult:
        """Charge ``amount_micros`` (micro-units of ``currency``) to ``payment_method_ref``.

        Returns:
          ChargeResult: Succeeded or declined (a decline is an answer, not an error).

        Raises:
          ProviderTimeout: No answer in time; the charge may have happened.
          ProviderError: Any other transient failure; retry with the same key.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
