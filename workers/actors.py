"""The four Dramatiq actors (names, queues and arguments are the SPEC's contract).

Importing this module binds the actors to a broker made from
``BILLING_REDIS_URL`` (and sets it as Dramatiq's global broker), so that
``dramatiq workers.actors`` and ``billing worker`` run them.

Retry policy by type: :class:`~tasks.errors.PermanentError` is in every
actor's ``throws`` (recorded, not retried, dead-lettered); anything else is
retried with exponential backoff up to ``BILLING_MAX_RETRIES``.
"""

from __future__ import annotations

from typing import Any

import dramatiq
import structlog
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.middleware import CurrentMessage

from tasks.errors import MessageValidationError, PermanentError
from tasks.messages import BILLING_QUEUE, PAYMENTS_QUEUE
from tasks.signing import SIGNATURE_OPTION

from .app import build_service
from .billing import BillingService, Delivery
from .broker import make_broker
from .logging import configure_logging
from .metrics import PrometheusMetrics
from .middleware import OutboxSweeper, UnknownActorRecorder
from .middleware.shutdown import ShutdownDeadline
from .settings import get_settings

__all__ = ["broker", "subscribe", "renew", "auto_top_up", "revoke_key", "get_service", "ACTORS"]

settings = get_settings()
configure_logging(settings.log_format, settings.log_level)
broker = make_broker(settings)
dramatiq.set_broker(broker)
signing_keys = settings.message_signing_keys()
if signing_keys is None:
    structlog.get_logger("billing").warning(
        "message_signing_disabled",
        reason="BILLING_SIGNING_KEYS is not set: anyone who can write to Redis can enqueue billing messages",
    )

if settings.key_delivery_public_key:
    from tasks.key_sealing import parse_public_key

    # refuse a bad key at start-up, not at the first subscribe
    parse_public_key(settings.key_delivery_public_key, "BILLING_KEY_DELIVERY_PUBLIC_KEY")
else:
    structlog.get_logger("billing").warning(
        "api_key_delivery_not_durable",
        reason="BILLING_KEY_DELIVERY_PUBLIC_KEY is not set: issued API keys go out once on Redis pub/sub "
        "and are lost if nobody is listening (accounts with their own recipient key excepted)",
    )

_service: BillingService | None = None


def get_service() -> BillingService:
    """The process's BillingService, created on first use (on the AsyncIO event loop)."""
    global _service
    if _service is None:
        _service = build_service(settings, broker=broker, exit_on_crash=True)
    return _service


async def _sweep(older_than_s: float) -> int:
    return await get_service().sweep_outbox(older_than_s=older_than_s)


broker.add_middleware(
    OutboxSweeper(
        _sweep, interval_ms=settings.outbox_sweep_interval_ms, older_than_ms=settings.outbox_sweep_after_ms
    )
)

# a worker process exits within BILLING_WORKER_SHUTDOWN_TIMEOUT_MS + 2 s of a stop signal, however sent
broker.add_middleware(ShutdownDeadline(settings.worker_shutdown_timeout_ms))

if settings.metrics_enabled:
    # Dramatiq's Prometheus middleware (started at process boot) and the billing metrics
    broker.add_middleware(PrometheusMetrics())

_OPTIONS: dict[str, Any] = {
    "max_retries": settings.max_retries,
    "min_backoff": settings.min_backoff_ms,
    "max_backoff": settings.max_backoff_ms,
    "throws": (PermanentError,),
}


async def _run(actor_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    message = CurrentMessage.get_current_message()
    assert message is not None
    delivery = Delivery(
        message_id=message.message_id,
        retries=int(message.options.get("retries", 0)),
        max_retries=int(message.options.get("max_retries", settings.max_retries)),
        queue_name=message.queue_name,
        signature=message.options.get(SIGNATURE_OPTION),
    )
    service = get_service()
    if args:
        payload: Any = {"args": list(args), "kwargs": kwargs}
        error = MessageValidationError("positional arguments are not accepted: send keyword arguments only")
        await service.record_failure(
            actor_name, payload, None, delivery, error, attempts=delivery.retries + 1
        )
        raise error
    return await service.handle(actor_name, kwargs, delivery)


@dramatiq.actor(actor_name="subscribe", queue_name=BILLING_QUEUE, **_OPTIONS)
async def subscribe(*args: Any, **kwargs: Any) -> None:
    """Charge the first period, create the subscription, issue a managed key."""
    await _run("subscribe", args, kwargs)


@dramatiq.actor(actor_name="renew", queue_name=BILLING_QUEUE, **_OPTIONS)
async def renew(*args: Any, **kwargs: Any) -> None:
    """Charge the next period and advance it (at most once per period)."""
    await _run("renew", args, kwargs)


@dramatiq.actor(actor_name="auto_top_up", queue_name=PAYMENTS_QUEUE, **_OPTIONS)
async def auto_top_up(*args: Any, **kwargs: Any) -> None:
    """Charge the payment method through the provider and credit the ledger."""
    await _run("auto_top_up", args, kwargs)


@dramatiq.actor(actor_name="revoke_key", queue_name=BILLING_QUEUE, **_OPTIONS)
async def revoke_key(*args: Any, **kwargs: Any) -> None:
    """Revoke one key, or the managed keys of a subscription."""
    await _run("revoke_key", args, kwargs)


ACTORS = {a.actor_name: a for a in (subscribe, renew, auto_top_up, revoke_key)}


async def _record_unknown_actor(message: dramatiq.Message[Any]) -> None:
    error = MessageValidationError(
        f"unknown actor {str(message.actor_name)[:100]!r}: the contract's actors are {sorted(ACTORS)}"
    )
    delivery = Delivery(message_id=message.message_id, queue_name=message.queue_name)
    await get_service().record_failure(
        str(message.actor_name),
        {"args": list(message.args), "kwargs": message.kwargs},
        None,
        delivery,
        error,
        attempts=1,
    )


broker.add_middleware(UnknownActorRecorder(set(ACTORS), _record_unknown_actor))


def _record_undecodable(queue_name: str, redis_id: str, payload: bytes, error: BaseException) -> None:
    loop = get_event_loop_thread()
    if loop is None:
        raise RuntimeError("the AsyncIO event loop thread is not running")
    loop.run_coroutine(get_service().record_undecodable(queue_name, redis_id, payload, error))


broker.undecodable_handler = _record_undecodable
