"""The one drain of the harness: wait until the queues hold no message, the workers are idle, the outbox relayed.

Used (through :mod:`harness.services`) by the demo, chaos, the bench and the
tests.  Dramatiq's Redis layout read here: ``dramatiq:<queue>`` (ready ids),
``dramatiq:<queue>.DQ`` (delayed ids), ``dramatiq:<queue>.msgs`` and
``dramatiq:<queue>.DQ.msgs`` (every message not yet acknowledged: ready,
delayed, or held by a worker).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis

from db.config import plain_url
from tasks.messages import MESSAGE_MODELS

__all__ = ["BILLING_QUEUES", "DrainState", "QueueCounts", "drain", "pending_messages", "queue_counts"]

#: The queues of the billing actors, from the contract's registry of kinds.
BILLING_QUEUES: tuple[str, ...] = tuple(dict.fromkeys(m.queue_name for m in MESSAGE_MODELS.values()))
NAMESPACE = "dramatiq"


@dataclass(frozen=True)
class QueueCounts:
    """One queue's messages in Redis.

    Attributes:
      ready: Waiting to be fetched.
      delayed: Waiting for their time (retries, delayed messages).
      pending: Every message not yet acknowledged (ready, delayed, or held by a worker).
    """

    queue: str
    ready: int
    delayed: int
    pending: int

    @property
    def in_flight(self) -> int:
        """Held by a worker (fetched, not yet acknowledged)."""
        return max(0, self.pending - self.ready - self.delayed)

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.ready or self.delayed)


def queue_counts(client: redis.Redis, queues: Sequence[str] = BILLING_QUEUES) -> list[QueueCounts]:
    """The counts of ``queues``, in one round trip and one snapshot (``MULTI``/``EXEC``: a message moving
    from a delay queue to its queue is never missed between two reads)."""
    pipe = client.pipeline(transaction=True)
    for queue in queues:
        pipe.llen(f"{NAMESPACE}:{queue}")
        pipe.llen(f"{NAMESPACE}:{queue}.DQ")
        pipe.hlen(f"{NAMESPACE}:{queue}.msgs")
        pipe.hlen(f"{NAMESPACE}:{queue}.DQ.msgs")
    n = [int(x) for x in pipe.execute()]
    return [
        QueueCounts(queue, n[4 * i], n[4 * i + 1], n[4 * i + 2] + n[4 * i + 3])
        for i, queue in enumerate(queues)
    ]


def pending_messages(client: redis.Redis, queues: Sequence[str] = BILLING_QUEUES) -> int:
    """Messages of ``queues`` (and their delay queues) not yet acknowledged."""
    return sum(c.pending for c in queue_counts(client, queues))


@dataclass(frozen=True)
class DrainState:
    """What one look of :func:`drain` saw."""

    queues: list[QueueCounts]
    outbox: int
    at: float  # time.time() of the look

    @property
    def drained(self) -> bool:
        return self.outbox == 0 and not any(q.busy for q in self.queues)

    def detail(self) -> str:
        """``drained``, or what is left (per busy queue, and the outbox)."""
        busy = [q for q in self.queues if q.busy]
        text = ", ".join(
            f"{q.queue}: ready {q.ready} delayed {q.delayed} in flight {q.in_flight}" for q in busy
        ) + (f"; outbox {self.outbox}" if self.outbox else "")
        return text or "drained"


async def _outbox_size(url: str) -> int:
    conn = await asyncpg.connect(
        plain_url(url), server_settings={"application_name": "billing-harness-drain"}
    )
    try:
        return int(await conn.fetchval("SELECT count(*) FROM outbox"))
    finally:
        await conn.close()


def drain(
    client: redis.Redis,
    database_url: str | None,
    *,
    queues: Sequence[str] = BILLING_QUEUES,
    timeout_s: float = 60,
    worker: Any = None,
    quiet_needed: int = 1,
    poll_s: float = 0.02,
    retry_errors: bool = False,
    check: Callable[[DrainState], bool] | None = None,
) -> DrainState:
    """Wait until the queues hold no message, ``worker`` is idle and the outbox is empty.

    Parameters:
      client: The Redis of the queues.
      database_url: The database whose outbox must be empty (None: not looked at).
      worker: An in-process ``dramatiq.Worker``, joined at every look (its
        in-memory queues empty).
      quiet_needed: Drained looks in a row needed (workers in other processes
        may hold a message between two looks).
      poll_s: Pause between looks, in seconds.
      retry_errors: A Redis or PostgreSQL error counts as a busy look (a
        server being restarted) instead of raising.
      check: Called with every look; returning False stops the wait early
        (the state is returned as it is); it may raise to abort.

    Returns:
      The last look (``drained`` True unless ``check`` stopped the wait).

    Raises:
      TimeoutError: Not drained within ``timeout_s`` seconds (what is left in the message).
    """
    deadline = time.monotonic() + timeout_s
    quiet = 0
    state = DrainState([], 0, time.time())
    last_error = ""
    while True:
        if worker is not None:
            worker.join()
        try:
            # the outbox first: a row is deleted only once its message is in Redis, so a
            # message relayed between the two reads is still seen (in Redis)
            outbox = asyncio.run(_outbox_size(database_url)) if database_url else 0
            counts = queue_counts(client, queues)
        except (redis.RedisError, OSError, asyncpg.PostgresError) as exc:
            if not retry_errors:
                raise
            last_error = f"; last error {type(exc).__name__}: {exc}"
            quiet = 0
        else:
            state = DrainState(counts, outbox, time.time())
            quiet = quiet + 1 if state.drained else 0
            if check is not None and check(state) is False:
                return state
            if quiet >= quiet_needed:
                return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"not drained after {timeout_s:.0f} s: {state.detail()}{last_error}")
        time.sleep(poll_s)
