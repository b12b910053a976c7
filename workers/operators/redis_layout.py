"""Dramatiq's Redis layout, read for the operators' queue listings and dead-letter purges.

Dramatiq's Redis broker (``dramatiq/brokers/redis/dispatch.lua``) keeps, in
the default namespace ``dramatiq``:

====================================== =========================================
key                                    holds
====================================== =========================================
``dramatiq:{queue}``                   ready message ids (a list)
``dramatiq:{queue}.msgs``              id -> encoded message (ready and in flight)
``dramatiq:{queue}.DQ``                delayed messages (retries with backoff)
``dramatiq:{queue}.XQ``                dead-lettered ids, scored by time (ms)
``dramatiq:{queue}.XQ.msgs``           id -> encoded dead-lettered message
``dramatiq:__acks__.{worker}.{queue}`` ids a worker fetched and has not acked
``dramatiq:__heartbeats__``            worker ids scored by last heartbeat (ms)
====================================== =========================================

Every function takes a synchronous ``redis.Redis`` client (the broker's
``client``) and blocks; async callers run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import dramatiq

from tasks.messages import MESSAGE_MODELS

__all__ = [
    "NAMESPACE",
    "QUEUES",
    "QueueStats",
    "WorkerSeen",
    "queue_overview",
    "dead_lettered",
    "dead_ids_older_than",
    "remove_dead",
]

#: The contract's queues, in the order of :data:`tasks.messages.MESSAGE_MODELS`.
QUEUES: tuple[str, ...] = tuple(dict.fromkeys(model.queue_name for model in MESSAGE_MODELS.values()))
#: Dramatiq's default key namespace.
NAMESPACE = "dramatiq"


def _key(*parts: str) -> str:
    return f"{NAMESPACE}:{''.join(parts)}"


@dataclass(frozen=True)
class QueueStats:
    """Counts of one queue.

    Attributes:
      ready: Messages waiting to be fetched.
      delayed: Messages waiting for their eta (retries with backoff).
      in_flight: Messages fetched by a worker and not acknowledged yet (None:
        the broker does not say, RabbitMQ over AMQP).
      dead: Dead-lettered messages still in Redis (kept ``dead_message_ttl``).
      oldest_ready_age_s: Age in seconds of the oldest ready message (None: empty).
    """

    queue: str
    ready: int
    delayed: int
    in_flight: int | None
    dead: int
    oldest_ready_age_s: float | None


@dataclass(frozen=True)
class WorkerSeen:
    """A Dramatiq broker id seen in the heartbeats set.

    Every process that talks to the queues through Dramatiq's script beats
    (producers too); ``holding`` counts the messages it has in flight.
    """

    worker_id: str
    last_heartbeat_age_s: float
    alive: bool
    holding: int


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: bytes | str | None) -> dramatiq.Message[Any] | None:
    if raw is None:
        return None
    try:
        return dramatiq.Message.decode(raw if isinstance(raw, bytes) else raw.encode())
    except Exception:  # noqa: BLE001 - an undecodable entry is shown as unknown, never fatal here
        return None


def queue_overview(client: Any, *, heartbeat_timeout_ms: int) -> tuple[list[QueueStats], list[WorkerSeen]]:
    """Per-queue counts and the workers seen, read from Redis (a ``redis.Redis`` client).

    Parameters:
      heartbeat_timeout_ms: A worker whose last heartbeat is older is shown as not alive.
    """
    now_ms = time.time() * 1000
    beats = client.zrange(_key("__heartbeats__"), 0, -1, withscores=True)
    workers = [(_text(w), score) for w, score in beats]
    holding: dict[str, int] = {w: 0 for w, _ in workers}
    stats = []
    for queue in QUEUES:
        in_flight = 0
        for worker_id, _ in workers:
            n = sum(int(client.scard(_key("__acks__.", worker_id, ".", q))) for q in (queue, f"{queue}.DQ"))
            holding[worker_id] += n
            in_flight += n
        oldest = None
        head = client.lindex(_key(queue), 0)
        if head is not None:
            message = _decode(client.hget(_key(queue, ".msgs"), head))
            if message is not None:
                oldest = max(0.0, (now_ms - message.message_timestamp) / 1000)
        stats.append(
            QueueStats(
                queue=queue,
                ready=int(client.llen(_key(queue))),
                delayed=int(client.llen(_key(queue, ".DQ"))),
                in_flight=in_flight,
                dead=int(client.zcard(_key(queue, ".XQ"))),
                oldest_ready_age_s=oldest,
            )
        )
    seen = [
        WorkerSeen(
            worker_id=w,
            last_heartbeat_age_s=max(0.0, (now_ms - score) / 1000),
            alive=(now_ms - score) < heartbeat_timeout_ms,
            holding=holding[w],
        )
        for w, score in sorted(workers, key=lambda ws: -ws[1])
    ]
    return stats, seen


def dead_lettered(client: Any, queue: str) -> dict[str, tuple[str, dramatiq.Message[Any] | None]]:
    """Dramatiq message id -> (Redis id, message) of a queue's dead-letter hash (undecodable entries left out)."""
    found: dict[str, tuple[str, dramatiq.Message[Any] | None]] = {}
    for redis_id, raw in client.hscan_iter(_key(queue, ".XQ.msgs")):
        message = _decode(raw)
        if message is not None:
            found[message.message_id] = (_text(redis_id), message)
    return found


def dead_ids_older_than(client: Any, queue: str, cutoff_ms: float) -> list[str]:
    """Redis ids of the queue's dead-lettered messages dead-lettered at or before ``cutoff_ms`` (epoch ms)."""
    return [_text(i) for i in client.zrangebyscore(_key(queue, ".XQ"), 0, cutoff_ms)]


def remove_dead(client: Any, queue: str, redis_ids: list[str]) -> None:
    """Delete dead-lettered messages (by Redis id) from the queue's XQ set and hash, in one transaction."""
    if redis_ids:
        pipe = client.pipeline(transaction=True)
        pipe.zrem(_key(queue, ".XQ"), *redis_ids)
        pipe.hdel(_key(queue, ".XQ.msgs"), *redis_ids)
        pipe.execute()
