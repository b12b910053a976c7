"""The broker's ceiling: a Dramatiq actor that does nothing, on its own broker and queue.

Run by ``python -m dramatiq bench.noop --processes P --threads T`` with
``BENCH_REDIS_URL`` set (the same Redis as the billing workers).  Stock
Dramatiq: a plain ``RedisBroker`` with the default middleware; nothing of
ours.  What it measures is fetching, decoding, running an empty function and
acknowledging, per message.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from . import NOOP_ACTOR, NOOP_QUEUE

__all__ = ["QUEUE", "ACTOR", "broker", "noop"]

QUEUE = NOOP_QUEUE
ACTOR = NOOP_ACTOR

broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5"))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name=ACTOR, queue_name=QUEUE, max_retries=0)
def noop(n: int = 0) -> None:
    """Do nothing."""
