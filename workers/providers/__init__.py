"""Payment providers: the interface and its implementations, chosen by configuration."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from tasks.errors import ConfigurationError

from ..settings import Settings
from .base import ChargeResult, PaymentProvider
from .fake import FakePaymentProvider

__all__ = ["ChargeResult", "PaymentProvider", "FakePaymentProvider", "make_provider"]


def make_provider(settings: Settings, engine: AsyncEngine) -> PaymentProvider:
    """The provider named by ``BILLING_PAYMENT_PROVIDER`` (default ``fake``).

    Raises:
      ConfigurationError: Unknown provider name.
    """
    if settings.payment_provider == "fake":
        return FakePaymentProvider(
            engine,
            decline_rate=settings.fake_decline_rate,
            error_rate=settings.fake_error_rate,
            timeout_rate=settings.fake_timeout_rate,
            latency_ms=settings.fake_latency_ms,
            seed=settings.fake_seed,
        )
    raise ConfigurationError(f"unknown payment provider {settings.payment_provider!r} (known: fake)")
