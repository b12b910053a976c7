"""Relaying the transactional outbox: committed rows of ``outbox`` onto the broker.

Every process that writes the outbox relays what it wrote right after its
commit (:func:`relay`); a row whose relay never ran (the process died, or
the broker was down) is relayed by the outbox sweeper of any worker
(:meth:`workers.billing.BillingService.sweep_outbox`).  A relay that runs
twice sends the same message id and idempotency key: harmless.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dramatiq
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from db import money
from db.engine import translate_errors
from db.money import OutboxMessage

__all__ = ["enqueue", "relay", "relay_committed"]

log = structlog.get_logger("billing")


async def enqueue(broker: dramatiq.Broker, messages: list[OutboxMessage]) -> None:
    """Enqueue outbox messages on ``broker`` with their own message ids (in a thread, off the event loop).

    Raises:
      redis.RedisError: The broker could not be reached (what was enqueued stays enqueued).
    """

    def enqueue_all() -> None:
        for m in messages:
            message: dramatiq.Message[Any] = dramatiq.Message(
                queue_name=m.queue_name,
                actor_name=m.actor_name,
                args=(),
                kwargs=m.kwargs,
                options={},
                message_id=m.message_id,
            )
            broker.enqueue(message)

    await asyncio.to_thread(enqueue_all)


async def relay(engine: AsyncEngine, broker: dramatiq.Broker, messages: list[OutboxMessage]) -> None:
    """Enqueue committed outbox messages, then delete their rows (autocommit).

    Raises:
      redis.RedisError: The broker could not be reached; the rows stay for the sweeper.
      DatabaseUnavailable: The rows could not be deleted; the sweeper sends them again.
    """
    if not messages:
        return
    await enqueue(broker, messages)
    async with translate_errors(), engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        await money.delete_outbox(conn, [m.message_id for m in messages])


async def relay_committed(
    engine: AsyncEngine, broker: dramatiq.Broker | None, messages: list[OutboxMessage]
) -> None:
    """:func:`relay` right after the commit that wrote ``messages``; never raises.

    The effect is committed, so a relay that fails changes nothing for it: one
    ``outbox_relay_deferred`` line, and the rows wait for the outbox sweeper of
    any worker.  Without a broker (``None``) the rows are the sweeper's at once.
    """
    if not messages or broker is None:
        return
    try:
        await relay(engine, broker, messages)
    except Exception as exc:  # noqa: BLE001 - committed; the sweeper relays it
        log.warning("outbox_relay_deferred", error=type(exc).__name__, messages=len(messages))
