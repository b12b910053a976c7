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

A worker process takes its runtime from :func:`worker` (built once: logging,
start-up checks, the broker with the worker's middleware, and the service on
first use); ``workers.actors`` declares the actors on its broker.

Nothing here runs at import time.  The engines are bound to the event loop
they are first used on, so build them on the loop that will use them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import dramatiq
import structlog
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.middleware import CurrentMessage
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import make_engine
from tasks.errors import ConfigurationError, MessageValidationError, PermanentError
from tasks.messages import MESSAGE_MODELS
from tasks.signing import SIGNATURE_OPTION

from .billing import BillingService, Delivery
from .broker import BillingBroker, make_broker
from .crash import parse_crashpoints
from .logging import configure_logging
from .middleware import OutboxSweeper, UnknownActorRecorder
from .middleware.batches import BatchProcessing
from .middleware.shutdown import ShutdownDeadline
from .providers import make_provider
from .providers.base import PaymentProvider
from .scheduler import Scheduler
from .settings import Settings, get_settings

__all__ = [
    "WorkerRuntime",
    "actor_options",
    "build_broker",
    "build_engine",
    "build_provider",
    "build_scheduler",
    "build_service",
    "worker",
    "worker_broker",
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
) -> BillingBroker:
    """The broker on ``BILLING_BROKER_URL`` (else ``BILLING_REDIS_URL``), signing what it enqueues when ``BILLING_SIGNING_KEYS`` is set.

    ``amqp://``/``amqps://``: RabbitMQ (:class:`workers.rabbitmq.BillingRabbitmqBroker`);
    ``redis://``/``rediss://``/``unix://``: Redis (:class:`workers.broker.BillingRedisBroker`).

    Parameters:
      url: Overrides the settings' broker URL.
      client: A ready ``redis.Redis`` client (tests), instead of a URL.

    Raises:
      ConfigurationError: No broker URL and no client, a URL of another scheme, or bad signing keys.
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
        "usage_fast_path": settings.usage_fast_path,
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
        "resend_after": timedelta(milliseconds=settings.scheduler_resend_after_ms),
        "hold_at_most": timedelta(milliseconds=settings.scheduler_hold_max_ms),
        "policy": settings.billing_policy(),
        **overrides,
    }
    if "provider" not in options:
        # the reconciler asks it about top-ups still pending past their deadline
        options["provider"] = build_provider(settings, engine)
    return Scheduler(engine, broker, **options)


# ---------------------------------------------------------------------- the worker process


class WorkerRuntime:
    """What a worker process runs the actors with: its settings, its broker and, built on first use, its service.

    The broker carries the worker's middleware: the outbox sweeper, the
    shutdown deadline, the metrics (``BILLING_METRICS_ENABLED``) and the
    recorder of messages for unknown actors; undecodable payloads are
    recorded through :meth:`record_undecodable`.  Build it with
    :func:`worker`, once per process.

    Attributes:
      settings: The process's settings.
      broker: The broker the actors are declared on.
      service_factory: Builds the service on first use (on the AsyncIO
        middleware's event loop, which the engine is bound to).  A harness may
        replace it before the first message, e.g. to run the service on an
        injected clock.
    """

    def __init__(self, settings: Settings, broker: BillingBroker) -> None:
        self.settings = settings
        self.broker = broker
        self.service_factory: Callable[[], BillingService] = functools.partial(
            build_service, settings, broker=broker, exit_on_crash=True
        )
        self._service: BillingService | None = None

    def service(self) -> BillingService:
        """The process's service, built by :attr:`service_factory` on first use."""
        if self._service is None:
            self._service = self.service_factory()
        return self._service

    async def run(self) -> dict[str, Any]:
        """The body of every actor: the current Dramatiq message through :meth:`deliver`."""
        message = CurrentMessage.get_current_message()
        assert message is not None
        return await self.deliver(message)

    async def deliver(self, message: dramatiq.Message[Any]) -> dict[str, Any]:
        """One Dramatiq message through :meth:`BillingService.handle` (what its actor runs).

        Raises:
          MessageValidationError: Positional arguments (recorded, never retried).
          PermanentError / TransientError: As :meth:`BillingService.handle`.
        """
        actor_name, args, kwargs = message.actor_name, message.args, message.kwargs
        delivery = Delivery(
            message_id=message.message_id,
            retries=int(message.options.get("retries", 0)),
            max_retries=int(message.options.get("max_retries", self.settings.max_retries)),
            queue_name=message.queue_name,
            signature=message.options.get(SIGNATURE_OPTION),
        )
        service = self.service()
        if args:
            payload: Any = {"args": list(args), "kwargs": kwargs}
            error = MessageValidationError(
                "positional arguments are not accepted: send keyword arguments only"
            )
            await service.record_failure(
                actor_name, payload, None, delivery, error, attempts=delivery.retries + 1
            )
            raise error
        return await service.handle(actor_name, kwargs, delivery)

    async def unfinished(self, messages: list[dramatiq.Message[Any]]) -> set[str]:
        """The ids of the messages whose idempotency key an earlier delivery claimed and did not finish.

        A batch thread runs those one at a time (:mod:`workers.middleware.batches`).
        """
        keys = {m.message_id: m.kwargs.get("idempotency_key") for m in messages}
        wanted = sorted({k for k in keys.values() if isinstance(k, str)})
        if not wanted:
            return set()
        found = await self.service().unfinished(wanted)
        return {message_id for message_id, key in keys.items() if key in found}

    async def sweep(self, older_than_s: float) -> int:
        """Relay the outbox rows a dead worker left behind (the outbox sweeper's pass)."""
        return await self.service().sweep_outbox(older_than_s=older_than_s)

    async def record_unknown_actor(self, message: dramatiq.Message[Any]) -> None:
        """Record a message Dramatiq dead-lettered because its actor does not exist."""
        error = MessageValidationError(
            f"unknown actor {str(message.actor_name)[:100]!r}: the contract's actors are {sorted(MESSAGE_MODELS)}"
        )
        delivery = Delivery(message_id=message.message_id, queue_name=message.queue_name)
        await self.service().record_failure(
            str(message.actor_name),
            {"args": list(message.args), "kwargs": message.kwargs},
            None,
            delivery,
            error,
            attempts=1,
        )

    def record_undecodable(
        self, queue_name: str, redis_id: str, payload: bytes, error: BaseException
    ) -> None:
        """Record a payload that is not a Dramatiq message, on the AsyncIO event loop (the broker's handler).

        Raises:
          RuntimeError: The event loop thread is not running.
          DatabaseUnavailable: It could not be recorded (the consumer requeues it).
        """
        loop = get_event_loop_thread()
        if loop is None:
            raise RuntimeError("the AsyncIO event loop thread is not running")
        loop.run_coroutine(self.service().record_undecodable(queue_name, redis_id, payload, error))


def actor_options(settings: Settings) -> dict[str, Any]:
    """Dramatiq options of every actor: retries with backoff, and no retry of a :class:`PermanentError`."""
    return {
        "max_retries": settings.max_retries,
        "min_backoff": settings.min_backoff_ms,
        "max_backoff": settings.max_backoff_ms,
        "throws": (PermanentError,),
    }


@functools.cache
def worker() -> WorkerRuntime:
    """The worker process's runtime, built once: logging, start-up checks, the broker and its middleware.

    Configures logging (``BILLING_LOG_FORMAT``, ``BILLING_LOG_LEVEL``),
    refuses a bad ``BILLING_KEY_DELIVERY_PUBLIC_KEY``, warns when messages
    are not signed or API keys not delivered durably, builds the broker
    (Dramatiq's global broker from now on) and adds the worker's middleware.

    Raises:
      ConfigurationError: A setting that cannot work.
    """
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    log = structlog.get_logger("billing")
    if settings.message_signing_keys() is None:
        log.warning(
            "message_signing_disabled",
            reason="BILLING_SIGNING_KEYS is not set: anyone who can write to the broker can enqueue billing messages",
        )
    if settings.key_delivery_public_key:
        from tasks.key_sealing import parse_public_key

        # refuse a bad key at start-up, not at the first subscribe
        parse_public_key(settings.key_delivery_public_key, "BILLING_KEY_DELIVERY_PUBLIC_KEY")
    else:
        log.warning(
            "api_key_delivery_not_durable",
            reason="BILLING_KEY_DELIVERY_PUBLIC_KEY is not set: issued API keys go out once on Redis pub/sub "
            "and are lost if nobody is listening (accounts with their own recipient key excepted)",
        )
    broker = build_broker(settings)
    dramatiq.set_broker(broker)
    runtime = WorkerRuntime(settings, broker)
    broker.add_middleware(
        OutboxSweeper(
            runtime.sweep,
            interval_ms=settings.outbox_sweep_interval_ms,
            older_than_ms=settings.outbox_sweep_after_ms,
        )
    )
    # a worker process exits within BILLING_WORKER_SHUTDOWN_TIMEOUT_MS + 2 s of a stop signal, however sent
    broker.add_middleware(ShutdownDeadline(settings.worker_shutdown_timeout_ms))
    if settings.metrics_enabled:
        from .metrics import PrometheusMetrics

        # Dramatiq's Prometheus middleware (started at process boot) and the billing metrics
        broker.add_middleware(PrometheusMetrics())
    batch_queues = settings.batch_queue_names()
    if batch_queues:
        # high-volume queues: batches on the event loop instead of a thread per message
        broker.add_middleware(
            BatchProcessing(
                runtime.deliver,
                batch_queues,
                threads=settings.batch_threads,
                batch_size=settings.max_batch,
                unfinished=runtime.unfinished,
            )
        )
    broker.add_middleware(UnknownActorRecorder(set(MESSAGE_MODELS), runtime.record_unknown_actor))
    broker.undecodable_handler = runtime.record_undecodable
    return runtime


def worker_broker() -> BillingBroker:
    """The worker process's broker (:func:`worker`), which ``workers.actors`` declares the actors on."""
    return worker().broker
