"""The Dramatiq broker: Redis, default namespace and JSON encoding, AsyncIO for async actors."""

from __future__ import annotations

import random
import time
from typing import Any

import dramatiq
from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker
from dramatiq.middleware import AsyncIO, CurrentMessage

from tasks.errors import ConfigurationError

from .settings import Settings

__all__ = ["BillingRedisBroker", "make_broker", "REDIS_URL_ENV"]

REDIS_URL_ENV = "BILLING_REDIS_URL"


class BillingRedisBroker(RedisBroker):
    """Dramatiq's RedisBroker whose maintenance also runs on a timer.

    Stock Dramatiq requeues a dead worker's messages only on a maintenance
    pass drawn at random on 0.1% of commands; on a quiet queue that can take
    hours.  This broker also runs maintenance when ``maintenance_interval_ms``
    has passed since this process last did, so a message held by a dead
    worker comes back within ``heartbeat_timeout + maintenance_interval``.

    Parameters:
      maintenance_interval_ms: Longest gap between two maintenance passes of
        one process, in milliseconds.
      **kwargs: Passed to :class:`dramatiq.brokers.redis.RedisBroker`.
    """

    def __init__(self, *, maintenance_interval_ms: int = 5_000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.maintenance_interval_ms = maintenance_interval_ms
        self._last_maintenance = 0.0
        self._random = random.Random()

    def _should_do_maintenance(self, command: str) -> int:
        if command in ("ack", "nack"):
            return 0
        now = time.monotonic()
        due = (now - self._last_maintenance) * 1000 >= self.maintenance_interval_ms
        if due or self._random.randint(1, MAINTENANCE_SCALE) <= self.maintenance_chance:
            self._last_maintenance = now
            return 1
        return 0


def make_broker(settings: Settings, *, url: str | None = None, client: Any = None) -> BillingRedisBroker:
    """Create the broker from settings (``BILLING_REDIS_URL`` and the redelivery knobs).

    Parameters:
      url: Overrides ``settings.redis_url``.
      client: A ready ``redis.Redis`` client (tests), instead of a URL.

    Raises:
      ConfigurationError: No Redis URL and no client.
    """
    url = url or settings.redis_url
    if client is None and not url:
        raise ConfigurationError(
            f"{REDIS_URL_ENV} is not set (redis://host:port/db); `billing demo` starts its own Redis"
        )
    broker = BillingRedisBroker(
        url=url,
        client=client,
        heartbeat_timeout=settings.heartbeat_timeout_ms,
        maintenance_chance=settings.maintenance_chance,
        maintenance_interval_ms=settings.maintenance_interval_ms,
        dead_message_ttl=settings.dead_message_ttl_ms,
    )
    broker.add_middleware(AsyncIO())
    broker.add_middleware(CurrentMessage())
    return broker


def set_default_broker(broker: dramatiq.Broker) -> None:
    """Make ``broker`` the global Dramatiq broker (actors declared later bind to it)."""
    dramatiq.set_broker(broker)
