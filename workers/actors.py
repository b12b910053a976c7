"""The Dramatiq actors, one per message kind of :data:`tasks.messages.MESSAGE_MODELS`.

Importing this module declares the actors on the worker's broker
(:func:`workers.app.worker_broker`, Dramatiq's global broker), so that
``dramatiq workers.actors`` and ``billing worker`` run them.  Each actor's
name and queue are its model's ``actor_name`` and ``queue_name`` (the
contract), its docstring the model's; every actor runs the same body,
:meth:`workers.app.WorkerRuntime.run` (or, on a batch queue, :meth:`~workers.app.WorkerRuntime.deliver`
from a batch thread, :mod:`workers.middleware.batches`).

Retry policy by type: :class:`~tasks.errors.PermanentError` is in every
actor's ``throws`` (recorded, not retried, dead-lettered); anything else is
retried with exponential backoff up to ``BILLING_MAX_RETRIES``.
"""

from __future__ import annotations

from typing import Any

import dramatiq

from tasks.messages import MESSAGE_MODELS, BillingMessage

from . import app
from .billing import BillingService

__all__ = ["broker", "get_service", "ACTORS"]

_runtime = app.worker()
#: The broker the actors are declared on (``dramatiq workers.actors`` takes it from here).
broker = _runtime.broker
#: The settings the worker runs with.
settings = _runtime.settings


def get_service() -> BillingService:
    """The process's BillingService, created on first use (on the AsyncIO event loop)."""
    return _runtime.service()


def _declare(model: type[BillingMessage]) -> dramatiq.Actor[Any, Any]:
    name = model.actor_name

    async def run(*args: Any, **kwargs: Any) -> None:
        await _runtime.run()

    run.__name__ = run.__qualname__ = name
    run.__doc__ = model.__doc__
    declare = dramatiq.actor(
        actor_name=name, queue_name=model.queue_name, broker=broker, **app.actor_options(settings)
    )
    return declare(run)


#: Actor name -> actor, for every kind of the contract.
ACTORS: dict[str, dramatiq.Actor[Any, Any]] = {name: _declare(m) for name, m in MESSAGE_MODELS.items()}
