"""Record, for operators, messages Dramatiq dead-letters before any billing code sees them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import dramatiq
import structlog
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.middleware import Middleware

__all__ = ["UnknownActorRecorder"]

log = structlog.get_logger("billing")


class UnknownActorRecorder(Middleware):
    """Records messages for an actor that does not exist, which Dramatiq moves to the dead-letter queue.

    Dramatiq's consumer thread looks the actor up when it hands a message to
    the workers (``Worker.handle_message``; a delayed message when its eta
    comes) and fails one whose actor is not declared (``Received message for
    undefined actor ... Moving it to the DLQ``) without running any actor,
    so it would otherwise be visible only in Redis until its dead-letter
    retention ends.  After that nack, ``record(message)`` runs on the AsyncIO
    event loop thread; the worker's recorder
    (:meth:`workers.app.WorkerRuntime.record_unknown_actor`) writes it to
    ``failed_messages`` as a ``message_validation_error`` naming the actor.
    A nacked message of a known actor (a permanent error, exhausted retries)
    is recorded by the service itself and ignored here.

    Parameters:
      known_actors: The actor names this worker serves.
      record: ``async record(message)``; errors are logged, never raised.
    """

    def __init__(
        self, known_actors: set[str], record: Callable[[dramatiq.Message[Any]], Awaitable[None]]
    ) -> None:
        self.known_actors = known_actors
        self.record = record

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        """Record a rejected message whose actor is unknown."""
        if message.actor_name in self.known_actors:
            return
        loop = get_event_loop_thread()
        if loop is None:
            return
        try:
            loop.run_coroutine(self.record(message))
        except Exception as exc:  # noqa: BLE001 - operators still have Dramatiq's dead-letter queue
            log.error("could_not_record_unknown_actor", error=type(exc).__name__)
