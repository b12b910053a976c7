"""What the naive peers share: a stock Dramatiq broker with the AsyncIO middleware, and an asyncpg pool.

Imported by :mod:`bench.naive` and :mod:`bench.naive_usage`, each run as its
own worker (``python -m dramatiq bench.<module>``) with ``BENCH_REDIS_URL``,
``BENCH_DATABASE_URL`` and ``BENCH_THREADS`` set: nothing of this project's
runtime, as a competent first version would be written.
"""

from __future__ import annotations

import asyncio
import os

import asyncpg
import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AsyncIO

__all__ = ["broker", "get_pool"]

#: A plain ``RedisBroker`` with the ``AsyncIO`` middleware, set as Dramatiq's global broker.
broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5"))
broker.add_middleware(AsyncIO())
dramatiq.set_broker(broker)

_pool: asyncpg.Pool | None = None
_pool_lock: asyncio.Lock | None = None


async def get_pool() -> asyncpg.Pool:
    """The process's asyncpg pool on ``BENCH_DATABASE_URL``, sized to ``BENCH_THREADS`` (created on first use)."""
    global _pool, _pool_lock
    if _pool is None:
        _pool_lock = _pool_lock or asyncio.Lock()
        async with _pool_lock:
            if _pool is None:
                url = os.environ["BENCH_DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://", 1)
                threads = int(os.environ.get("BENCH_THREADS", "16"))
                _pool = await asyncpg.create_pool(url, min_size=1, max_size=threads)
    return _pool
