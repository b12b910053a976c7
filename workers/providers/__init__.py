"""Payment providers: the interface and its implementations, chosen by configuration."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from tasks.errors import ConfigurationError

from ..settings import Settings
from .base import ChargeLookup, ChargeResult, PaymentProvider, ProviderCharge
from .fake import FakePaymentProvider
from .stripe import StripePaymentProvider

__all__ = [
    "ChargeLookup",
    "ChargeResult",
    "PaymentProvider",
    "ProviderCharge",
    "FakePaymentProvider",
    "StripePaymentProvider",
    "make_provider",
    "provider_class",
]


def provider_class(name: str) -> type[PaymentProvider]:
    """The provider class named ``name`` (``BILLING_PAYMENT_PROVIDER``), for its class-level checks.

    Raises:
      ConfigurationError: Unknown provider name.
    """
    known: dict[str, type[PaymentProvider]] = {"fake": FakePaymentProvider, "stripe": StripePaymentProvider}
    if name not in known:
        raise ConfigurationError(f"unknown payment provider {name!r} (known: fake, stripe)")
    return known[name]


def make_provider(settings: Settings, engine: AsyncEngine) -> PaymentProvider:
    """The provider named by ``BILLING_PAYMENT_PROVIDER`` (default ``fake``).

    ``fake`` keeps its charges in ``engine``'s database; ``stripe`` charges
    through Stripe with ``BILLING_STRIPE_API_KEY`` (and optionally
    ``BILLING_STRIPE_API_BASE``, ``BILLING_STRIPE_TIMEOUT_MS``).

    Raises:
      ConfigurationError: Unknown provider name, or ``stripe`` without an API key.
    """
    if settings.payment_provider == "fake":
        return FakePaymentProvider(
            engine,
            decline_rate=settings.fake_decline_rate,
            error_rate=settings.fake_error_rate,
            timeout_rate=settings.fake_timeout_rate,
            latency_ms=settings.fake_latency_ms,
            seed=settings.fake_seed,
            processing_ms=settings.fake_processing_ms,
        )
    if settings.payment_provider == "stripe":
        if settings.stripe_api_key is None or not settings.stripe_api_key.get_secret_value():
            raise ConfigurationError(
                "BILLING_STRIPE_API_KEY is not set (needed by BILLING_PAYMENT_PROVIDER=stripe)"
            )
        return StripePaymentProvider(
            settings.stripe_api_key.get_secret_value(),
            api_base=settings.stripe_api_base,
            timeout_ms=settings.stripe_timeout_ms,
        )
    raise ConfigurationError(f"unknown payment provider {settings.payment_provider!r} (known: fake, stripe)")
