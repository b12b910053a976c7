"""``billing worker``, ``billing scheduler``, ``billing audit`` and ``billing contract``: running the system."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import click

from tasks.errors import ConfigurationError
from tasks.messages import QUEUE_OF_ACTOR

from .common import run_db

#: The contract's queues (``billing worker --queues``).
QUEUE_NAMES = frozenset(QUEUE_OF_ACTOR.values())

__all__ = ["audit", "contract", "scheduler", "worker"]


@click.command("worker")
@click.option(
    "--processes",
    "-p",
    "processes",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Worker processes.",
)
@click.option(
    "--threads",
    "-t",
    "threads",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    help="Threads per process (they mostly wait on PostgreSQL; concurrent renewals share a group commit).",
)
@click.option(
    "--poll-ms",
    "poll_ms",
    type=click.IntRange(10, 10_000),
    default=100,
    show_default=True,
    help="Longest pause of a queue's consumer between two polls (Dramatiq's worker timeout, stock 1000).",
)
@click.option(
    "--shutdown-timeout-ms",
    "shutdown_timeout_ms",
    type=click.IntRange(100, 600_000),
    default=None,
    help="Time in-flight messages get to finish once stopped; every process exits within it + 5 s "
    "[default: BILLING_WORKER_SHUTDOWN_TIMEOUT_MS, else 20000].",
)
@click.option(
    "--queues",
    "queues",
    multiple=True,
    type=click.Choice(sorted(QUEUE_NAMES)),
    help="Consume only these queues (repeatable), e.g. a fleet of its own for billing.usage [default: all].",
)
def worker(
    processes: int, threads: int, poll_ms: int, shutdown_timeout_ms: int | None, queues: tuple[str, ...]
) -> None:
    """Run a Dramatiq worker over the billing actors (queues billing, billing.payments and billing.usage).

    ``--queues`` gives a queue its own workers: usage events arrive by the
    thousand a second, and top-ups wait on the payment provider.

    A consumer that finds nothing to fetch (its queue empty, or its
    prefetch full while the threads are busy) backs off exponentially up to
    Dramatiq's worker timeout before it polls again; at the stock 1000 ms a
    message arriving then waits up to a second.  ``--poll-ms`` (100) bounds
    that wait, for the price of a few idle polls a second.

    Stopping: the first SIGTERM/SIGINT (to the main pid or the whole process
    group) lets in-flight messages finish for up to ``--shutdown-timeout-ms``;
    signals within 1 s of it are the same request.  A later signal, or the
    deadline (the timeout + 2 s), ends each worker process at once, leaving
    what is still running unacked for redelivery (``ShutdownDeadline``).
    """
    from ..settings import get_settings

    settings = get_settings()
    if shutdown_timeout_ms is None:
        shutdown_timeout_ms = settings.worker_shutdown_timeout_ms
    if not settings.message_broker_url():
        raise ConfigurationError(
            "BILLING_BROKER_URL (or BILLING_REDIS_URL) is not set; `billing demo` starts its own Redis"
        )
    if not settings.database_url:
        raise ConfigurationError("BILLING_DATABASE_URL is not set; `billing demo` starts its own PostgreSQL")
    argv = [
        sys.executable,
        "-m",
        "dramatiq",
        "workers.actors",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--worker-shutdown-timeout",
        str(shutdown_timeout_ms),
        *(["--queues", *queues] if queues else []),
    ]
    env = dict(os.environ)
    # read by workers.actors' ShutdownDeadline in every worker process
    env["BILLING_WORKER_SHUTDOWN_TIMEOUT_MS"] = str(shutdown_timeout_ms)
    # a connection per thread, plus the outbox sweeper's, a renewal batch's and a usage batch's two
    env.setdefault("BILLING_DB_POOL_SIZE", str(threads + 4))
    env["dramatiq_worker_timeout"] = str(poll_ms)  # read by dramatiq.worker at import
    if settings.metrics_enabled:
        from ..metrics import exposition_env

        # Dramatiq's Prometheus middleware reads its directory, host and port from the environment
        try:
            env.update(exposition_env(settings))
        except OSError as exc:
            raise ConfigurationError(f"cannot prepare the metrics directory: {exc}") from exc
    os.execve(sys.executable, argv, env)


@click.command("scheduler")
@click.option("--once", is_flag=True, help="Run one pass and exit.")
@click.option(
    "--interval-ms",
    "interval_ms",
    type=click.IntRange(100, None),
    default=None,
    help="Time between passes (default BILLING_SCHEDULER_INTERVAL_MS, 60000).",
)
@click.option(
    "--lead-time-ms",
    "lead_ms",
    type=click.IntRange(0, None),
    default=None,
    help="Renew periods ending this soon (default BILLING_RENEWAL_LEAD_MS, 0).",
)
@click.option(
    "--progress/--no-progress",
    "progress",
    default=None,
    help="Progress bar (default: when --once runs on a terminal).",
)
def scheduler(once: bool, interval_ms: int | None, lead_ms: int | None, progress: bool | None) -> None:
    """Enqueue due renewals and dunning retries (one scanning scheduler at a time, any number running)."""
    import signal
    from datetime import timedelta

    from ..app import build_broker, build_engine, build_scheduler
    from ..logging import configure_logging
    from ..settings import get_settings

    settings = get_settings()
    if not settings.database_url:
        raise ConfigurationError("BILLING_DATABASE_URL is not set")
    configure_logging(settings.log_format, settings.log_level)
    broker = build_broker(settings)
    show_progress = progress if progress is not None else (once and sys.stdout.isatty())

    async def go() -> Any:
        engine = build_engine(settings, pool_size=2)
        sched = build_scheduler(settings, engine=engine, broker=broker, lead_ms=lead_ms)
        try:
            if once:
                if not show_progress:
                    return await sched.run_pass()
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                with Progress(
                    TextColumn("enqueueing renewals"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
                ) as bar:
                    task = bar.add_task("renewals", total=None)
                    return await sched.run_pass(
                        on_total=lambda n: bar.update(task, total=n),
                        on_batch=lambda n: bar.advance(task, n),
                    )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            interval = timedelta(milliseconds=interval_ms or settings.scheduler_interval_ms)
            await sched.run_forever(interval=interval, stop=stop)
            return None
        finally:
            await engine.dispose()
            broker.close()

    report = asyncio.run(go())
    if report is not None:
        if not report.ran:
            click.echo("another scheduler is scanning; nothing done")
        else:
            click.echo(
                f"enqueued {report.renewals} renewals and {report.retries} dunning retries in {report.seconds:.2f} s"
            )


@click.command("audit")
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--drained",
    is_flag=True,
    help="Also run the checks that hold only with no work in flight (queues and outbox empty).",
)
def audit(as_json: bool, drained: bool) -> None:
    """Check SPEC's invariants (read-only, safe on a live system); exit 1 with the violations."""
    from db.audit import run_audit

    from ..settings import get_settings

    policy = get_settings().billing_policy()  # the workers' top-up limit
    report = run_db(lambda engine: run_audit(engine, quiescent=drained, policy=policy))
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "violations": report.violations}, indent=2, default=str))
    else:
        for name, rows in report.violations.items():
            click.echo(
                f"{'FAIL' if rows else 'ok  '} {name}: {report.descriptions[name]}"
                + (f" ({len(rows)})" if rows else "")
            )
    sys.exit(0 if report.ok else 1)


@click.command("contract")
def contract() -> None:
    """Print the message contract as JSON Schema (for producers in other languages)."""
    from tasks.schema import contract_schema

    click.echo(json.dumps(contract_schema(), indent=2, sort_keys=True))
