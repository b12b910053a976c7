"""The composition root: :class:`~workers.settings.Settings` in, the runtime's parts out.

Every process that needs an engine, a broker, a payment provider, the
billing service or a scheduler builds it here, from one ``Settings``
(:func:`workers.settings.get_settings` unless given), so each part is
configured one way wherever it runs: the worker, the CLI, the dashboard,
the scheduler, the harness and the tests::

    settings = get_settings()
    engine = build_engine(settings)
    broker = build_broker(settings)
    service = build_service(settings, engine=engine, broker=broker)

Nothing here runs at import time.  The engines are bound to the event loop
they are first used on, so build them on the loop that will use them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import make_engine
from tasks.errors import ConfigurationError

from .billing import BillingService
from .broker import BillingRedisBroker, make_broker
from .crash import parse_crashpoints
from .providers import make_provider
from .providers.base import PaymentProvider
from .scheduler import Scheduler
from .settings import Settings, get_settings

__all__ = [
    "build_broker",
    "build_engine",
    "build_provider",
    "build_scheduler",
    "build_service",
]


def build_engine(
    settings: Settings | None = None, *, pool_size: int | None = None, max_overflow: int = 5
) -> AsyncEngine:
    """The async engine on ``BILLING_DATABASE_URL``.

    Parameters:
      pool_size: Connections kept open (default ``BILLING_DB_POOL_SIZE``).
      max_overflow: Extra connections allowed under bursts.

    Raises:
      ConfigurationError: ``BILLING_DATABASE_URL`` is not set.
    """
    settings = settings or get_settings()
    if not settings.database_url:
        raise ConfigurationError("BILLING_DATABASE_URL is not set")
    return make_engine(
        settings.database_url,
        pool_size=settings.db_pool_size if pool_size is None else pool_size,
        max_overflow=max_overflow,
    )


def build_broker(
    settings: Settings | None = None, *, url: str | None = None, client: Any = None
) -> BillingRedisBroker:
    """The Redis broker on ``BILLING_REDIS_URL``, signing what it enqueues when ``BILLING_SIGNING_KEYS`` is set.

    Parameters:
      url: Overrides ``settings.redis_url``.
      client: A ready ``redis.Redis`` client (tests), instead of a URL.

    Raises:
      ConfigurationError: No Redis URL and no client, or bad signing keys.
    """
    return make_broker(settings or get_settings(), url=url, client=client)


def build_provider(settings: Settings | None, engine: AsyncEngine) -> PaymentProvider:
    """The payment provider named by ``BILLING_PAYMENT_PROVIDER`` (the fake one keeps its charges in ``engine``).

    Raises:
      ConfigurationError: Unknown provider name, or ``stripe`` without an API key.
    """
    return make_provider(settings or get_settings(), engine)


def build_service(
    settings: Settings | None = None,
    *,
    engine: AsyncEngine | None = None,
    broker: Any = None,
    **overrides: Any,
) -> BillingService:
    """The billing service with every knob from ``settings``.

    Parameters:
      engine: Default :func:`build_engine` (``BILLING_DB_POOL_SIZE`` connections).
      broker: The broker the outbox is relayed to (None: leave it to the sweeper).
      **overrides: :class:`~workers.billing.BillingService` fields to set instead
        of the settings' (``provider``, ``clock``, ``exit_on_crash``...).

    Raises:
      ConfigurationError: A setting the service needs is missing or wrong.
    """
    settings = settings or get_settings()
    engine = engine if engine is not None else build_engine(settings)
    fields: dict[str, Any] = {
        "policy": settings.billing_policy(),
        "max_deliveries": settings.max_deliveries,
        "crashpoints": parse_crashpoints(settings.crashpoints),
        "signing_keys": settings.message_signing_keys(),
        "renew_fast_path": settings.renew_fast_path,
        "max_batch": settings.max_batch,
        "max_batches_in_flight": settings.max_batches_in_flight,
        **overrides,
    }
    if "provider" not in fields:
        fields["provider"] = build_provider(settings, engine)
    return BillingService(engine=engine, broker=broker, **fields)


def build_scheduler(
    settings: Settings | None = None,
    *,
    engine: AsyncEngine,
    broker: Any,
    lead_ms: int | None = None,
    **overrides: Any,
) -> Scheduler:
    """The renewal scheduler (and the owners of waiting states it runs) from ``settings``.

    Parameters:
      engine: Its engine (two connections are enough).
      broker: The broker it enqueues renewals on.
      lead_ms: Renew this long before a period ends (default ``BILLING_RENEWAL_LEAD_MS``).
      **overrides: :class:`~workers.scheduler.Scheduler` arguments to set instead
        (``clock``, ``provider``, ``policy``...).
    """
    settings = settings or get_settings()
    options: dict[str, Any] = {
        "lead_time": timedelta(milliseconds=settings.renewal_lead_ms if lead_ms is None else lead_ms),
        "batch_size": settings.scheduler_batch_size,
        "policy": settings.billing_policy(),
        **overrides,
    }
    if "provider" not in options:
        # the reconciler asks it about top-ups still pending past their deadline
        options["provider"] = build_provider(settings, engine)
    return Scheduler(engine, broker, **options)
