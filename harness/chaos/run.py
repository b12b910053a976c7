"""``make chaos`` (``python -m harness.chaos``): faults injected while load flows, then an independent check.

The promise under test is SPEC's: no customer charged twice, no paid-for
effect lost.  A run:

1. **Services.**  A fresh database ``billing_chaos_<id>`` on the real
   PostgreSQL (the server of ``BILLING_DATABASE_URL``, else this machine's
   ``postgresql://postgres@127.0.0.1:5432/postgres``, else an embedded one,
   marked as such), migrated to head and dropped at the end; and its **own**
   ``redis-server`` on a spare loopback port with append-only persistence
   (``--appendonly yes --appendfsync always``), so it can be restarted
   without losing a message (fakeredis, and no Redis restart, when there is
   no ``redis-server``).
2. **Accounts and plans** (``db.money``): rich, poor, "racer" accounts that
   can pay for one of two plans, and auto-top-up accounts whose cards
   succeed, decline, or charge and then time out.  Traffic is drawn with a
   Zipf-like skew (weight ``1/rank**1.3``), so a few hot accounts take most
   of it and their row locks are contended.
3. **Load** from several producer processes (``tasks.Producer``), paced
   over ``CHAOS_SECONDS``: all four kinds, repeated keys (a message
   published again), racing subscribes of one account to two plans it can
   pay only one of, renewals of one period under the scheduler's key and
   under another, a few messages doomed to fail (unknown plan) and a few
   **poison** messages (keys ``poison-…``; the workers run with
   ``BILLING_CRASHPOINTS=before_commit:poison-``, so every delivery kills
   its worker).  A publish that fails with a connection error is retried
   with the same message id and key.  Producers write each published key to
   a file, which the runner reads back for the lost-message check.
4. **Workers**: ``CHAOS_WORKERS`` slots, each a ``python -m dramatiq
   harness.chaos_worker --processes 1 --threads 4`` process group with a 2 s
   heartbeat timeout, maintenance every 300 ms and a 200 ms worker timeout
   (``dramatiq_worker_timeout``), so a killed worker's messages come back
   within seconds.  A worker that exits (killed, or poisoned) is replaced.
5. **Faults**, all scheduled from one seed printed at the start
   (``CHAOS_SEED=… make chaos`` replays the schedule): SIGKILL of a worker
   slot every few seconds, one Redis restart (``SHUTDOWN``, which flushes
   the append-only file, an outage, then the same port and directory),
   ``pg_terminate_backend`` of the workers' PostgreSQL connections now and
   then, and the fake provider's random declines, errors and timeouts after
   charging.
6. **Checks**, once the load is published and the faults have stopped:
   the queues drain (ready, delayed and in flight all 0, outbox empty);
   ``run_audit(quiescent=True)`` passes; no double charge (a period charged
   twice, a provider charge credited twice); no lost message (every
   published key is completed, or failed/dead and recorded in
   ``failed_messages``).  A table shows the figures; the exit status is 1
   when any check fails.  Two Dramatiq bugs around a Redis restart are
   traced and named when they strike (:func:`retries_not_enqueued`,
   :func:`stranded_delayed`; ``docs/reliability.md``, Known issues).

Messages are signed (``BILLING_SIGNING_KEYS``, a key made for the run), as
``docker-compose.yml`` runs them.

Soak mode (``CHAOS_FAULTS=0``): no faults; the peak throughput is measured
first, then load is paced at 80% of it, and the
report gives enqueue-to-commit latency (p50/p99 per time window) and worker
RSS over time, and whether they stay flat (last third of the windows against the first).

``--write-docs`` (``make chaos`` passes it) writes the run's figures to
``docs/reliability.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from rich.console import Console

from harness.services import interrupt_on_sigterm, kill_group
from workers.clock import write_clock_offset

from .config import (
    FAKE_DECLINE_RATE,
    FAKE_ERROR_RATE,
    FAKE_TIMEOUT_RATE,
    PLANS,
    SCHEDULER_INTERVAL_MS,
    ZIPF_S,
    ChaosConfig,
    Fault,
    RunState,
    _env_int,
    plan_faults,
)
from .drive import drain_run, drive_owners
from .faults import drive_load
from .load import create_accounts, make_accounts, produce, producer_specs, read_published, start_producers
from .pool import WorkerPool, chaos_database, chaos_redis, pg_connect, rss_kib, schedule
from .report import report

__all__ = ["run_chaos", "main"]


async def _last_commit_ms(url: str) -> int:
    conn = await pg_connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT (extract(epoch FROM max(completed_at)) * 1000)::bigint FROM idempotency_keys"
            )
        )
    finally:
        await conn.close()


def run_chaos(cfg: ChaosConfig, console: Console | None = None) -> int:
    """Run chaos (or soak) as configured; print the table; return the exit status (0: every check passed)."""
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    run = uuid.uuid4().hex[:8]
    state = RunState(run=run)
    mode = "chaos" if cfg.faults else "soak"
    console.print(
        f"[bold]billing {mode} run {run}[/bold]: seed [bold]{cfg.seed}[/bold] "
        f"(replay: CHAOS_SEED={cfg.seed} CHAOS_SECONDS={cfg.seconds} make chaos), {cfg.seconds} s of load, "
        f"{cfg.workers} worker slots x {cfg.threads} threads, {cfg.producers} producers"
    )
    workdir = Path(tempfile.mkdtemp(prefix=f"billing-chaos-{run}-"))
    logs = workdir / "logs"
    logs.mkdir()
    ok = False
    restore_sigterm = interrupt_on_sigterm()
    producers: list[subprocess.Popen[bytes]] = []
    try:
        with ExitStack() as stack:
            db = stack.enter_context(chaos_database(run, console, keep=cfg.keep))
            rds = stack.enter_context(chaos_redis(workdir / "redis", console))
            console.print(f"PostgreSQL {db.version}: {db.label}")
            console.print(f"Redis {rds.version}: {rds.label}")
            accounts = make_accounts(run, cfg.accounts, cfg.seed)
            asyncio.run(create_accounts(db.url, accounts))
            kinds = Counter(a["kind"] for a in accounts)
            console.print(
                f"created {len(accounts)} accounts ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}) "
                f"and {len(PLANS)} plans; traffic skew 1/rank^{ZIPF_S}"
            )
            # the producers sign every message and the workers check it (tasks/signing.py)
            signing_keys = json.dumps({"chaos": secrets.token_hex(32)})
            clock_file = workdir / "clock-offset-ms"
            write_clock_offset(clock_file, timedelta(0))
            pool = WorkerPool(cfg, db.url, rds.url, logs, signing_keys, clock_file=clock_file)
            stack.callback(pool.stop_all)

            def stop_producers() -> None:
                for p in producers:
                    if p.poll() is None:
                        kill_group(p, signal.SIGKILL)
                        p.wait()

            stack.callback(stop_producers)
            pool.start_all()
            _wait_for_workers(rds.url, cfg.workers + 1, pool)
            pool.start_scheduler()
            console.print(
                f"{cfg.workers} billing (and billing.usage) workers, 1 billing.payments worker and the scheduler "
                f"(a pass every {SCHEDULER_INTERVAL_MS} ms) up; logs in {logs}"
            )

            t_zero = time.monotonic()

            def sample(_: float) -> None:
                at = time.monotonic() - t_zero
                if state.rss_samples and at - state.rss_samples[-1][0] < 2.0:
                    return
                for pid in pool.worker_pids():
                    kib = rss_kib(pid)
                    if kib:
                        state.rss_samples.append((at, kib))
                try:
                    client = redis.Redis.from_url(rds.url, socket_timeout=2)
                    try:
                        state.backlog_samples.append(
                            (
                                at,
                                int(client.llen("dramatiq:billing"))
                                + int(client.llen("dramatiq:billing.payments")),
                            )
                        )
                    finally:
                        client.close()
                except redis.RedisError:
                    pass

            all_specs: list[dict[str, Any]] = []
            if not cfg.faults:
                # measure the peak: a burst published at once, from its first publish to its last commit
                burst = max(2_000, min(5_000, cfg.messages // 4))
                specs = producer_specs(
                    cfg, state, db.url, rds.url, accounts, workdir,
                    phase="peak", count=burst, seconds=0, poison=0, doomed=0,
                )  # fmt: skip
                all_specs += specs
                console.print(f"measuring peak throughput: {burst:,} messages at once")
                producers[:] = start_producers(specs, signing_keys)
                for p in producers:
                    p.wait()
                if not drain_run(pool, rds, db, state, cfg.drain_timeout_s):
                    raise RuntimeError(f"the peak burst did not drain: {state.drain_detail}")
                first_publish_ms = min(r["t"] for r in read_published(specs)[0])
                last_commit_ms = asyncio.run(_last_commit_ms(db.url))
                state.peak_msgs_per_s = burst / max(0.001, (last_commit_ms - first_publish_ms) / 1000)
                state.soak_rate = cfg.soak_load * state.peak_msgs_per_s
                count = int(state.soak_rate * cfg.seconds)
                console.print(
                    f"peak {state.peak_msgs_per_s:,.0f} messages/s; soak at {cfg.soak_load:.0%}: "
                    f"{state.soak_rate:,.0f} messages/s, {count:,} messages over {cfg.seconds} s"
                )
                faults: list[Fault] = []
                poison = doomed = 0
            else:
                count = cfg.messages
                faults = plan_faults(cfg.seed, cfg.seconds, cfg.workers)
                poison, doomed = cfg.poison, 5
                by_kind = Counter(f.kind for f in faults)
                restart = next(f for f in faults if f.kind == "restart_redis")
                console.print(
                    f"fault schedule (seed {cfg.seed}): {by_kind['kill_worker']} worker SIGKILLs, "
                    f"{by_kind['terminate_pg']} pg_terminate_backend passes, Redis restart at {restart.at_s:.1f} s "
                    f"({restart.outage_s:.1f} s down); fake provider declines {FAKE_DECLINE_RATE:.0%}, errors "
                    f"{FAKE_ERROR_RATE:.0%}, times out after charging {FAKE_TIMEOUT_RATE:.0%}; {poison} poison messages"
                )
            specs = producer_specs(
                cfg, state, db.url, rds.url, accounts, workdir,
                phase="load", count=count, seconds=cfg.seconds, poison=poison, doomed=doomed,
            )  # fmt: skip
            all_specs += specs
            state.soak_start_ms = int(time.time() * 1000)
            t_zero = time.monotonic()
            state.rss_samples.clear()
            state.backlog_samples.clear()
            producers[:] = start_producers(specs, signing_keys)
            state.load_s = drive_load(
                cfg, pool, producers, faults, rds, db, state, console,
                seconds=cfg.seconds, sample=None if cfg.faults else sample,
            )  # fmt: skip
            failed_producers = [p.returncode for p in producers if p.returncode != 0]
            console.print(f"{state.load_s:6.1f}s load published; faults stopped; draining the queues")
            state.drained = drain_run(
                pool, rds, db, state, cfg.drain_timeout_s,
                sample=None if cfg.faults else sample, t0=state.load_s,
            )  # fmt: skip
            console.print(f"drain: {state.drain_detail} after {state.drain_s:.1f} s")
            if state.stranded:
                # what an operator would do: restart the workers; their acknowledgement sets are
                # requeued once the heartbeats expire, and the checks below see the end state
                console.print(
                    f"[yellow]{len(state.stranded)} delayed message(s) stranded in a live worker after the Redis "
                    "restart (known Dramatiq issue #527): restarting every worker[/yellow]"
                )
                first_drain_s = state.drain_s
                for slot in range(cfg.workers):
                    pool.kill(slot, reason="restart to recover stranded messages")
                state.drained_after_restart = drain_run(
                    pool, rds, db, state, cfg.drain_timeout_s, detect_stranded=False
                )
                state.drain_s += first_drain_s
                console.print(f"drain after the restart: {state.drain_detail} after {state.drain_s:.1f} s")
            drive_owners(pool, rds, db, state, console, timeout_s=cfg.drain_timeout_s)
            pool.stop_all()
            ok = report(cfg, state, db, rds, pool, all_specs, logs, failed_producers, console)
    except KeyboardInterrupt:
        console.print("[red]interrupted: workers, producers and Redis stopped, database dropped[/red]")
        return 130
    finally:
        restore_sigterm()
        if ok and not cfg.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            console.print(f"logs and producer records kept in {workdir}")
    return 0 if ok else 1


def _wait_for_workers(redis_url: str, n: int, pool: WorkerPool, timeout_s: float = 90) -> None:
    """Until ``n`` Dramatiq brokers beat on Redis (the slots' consumers are up).

    Raises:
      RuntimeError: Not within ``timeout_s`` seconds.
    """
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    deadline = time.monotonic() + timeout_s
    try:
        while int(client.zcard("dramatiq:__heartbeats__")) < n:
            pool.supervise()
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not start within {timeout_s:.0f} s")
            time.sleep(0.2)
    finally:
        client.close()


def _config_from_args(argv: list[str] | None) -> ChaosConfig:
    parser = argparse.ArgumentParser(
        prog="python -m harness.chaos",
        description="Chaos (or soak) run of the billing workers: faults while load flows, then the audit.",
    )
    parser.add_argument(
        "--seconds", type=int, default=_env_int("CHAOS_SECONDS", 120), help="load length (CHAOS_SECONDS, 120)"
    )
    parser.add_argument(
        "--seed", type=int, default=_env_int("CHAOS_SEED", None), help="seed (CHAOS_SEED; random)"
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=_env_int("CHAOS_MESSAGES", 20_000),
        help="messages (CHAOS_MESSAGES, 20000)",
    )
    parser.add_argument(
        "--faults",
        type=int,
        choices=(0, 1),
        default=_env_int("CHAOS_FAULTS", 1),
        help="0: soak mode (CHAOS_FAULTS, 1)",
    )
    parser.add_argument(
        "--workers", type=int, default=_env_int("CHAOS_WORKERS", 3), help="worker slots (CHAOS_WORKERS, 3)"
    )
    parser.add_argument(
        "--producers",
        type=int,
        default=_env_int("CHAOS_PRODUCERS", 3),
        help="producer processes (CHAOS_PRODUCERS, 3)",
    )
    parser.add_argument(
        "--accounts",
        type=int,
        default=_env_int("CHAOS_ACCOUNTS", 0),
        help="accounts (CHAOS_ACCOUNTS; messages/10)",
    )
    parser.add_argument(
        "--poison", type=int, default=_env_int("CHAOS_POISON", 3), help="poison messages (CHAOS_POISON, 3)"
    )
    parser.add_argument(
        "--drain-timeout",
        type=int,
        default=_env_int("CHAOS_DRAIN_TIMEOUT_S", 180),
        help="seconds (CHAOS_DRAIN_TIMEOUT_S, 180)",
    )
    parser.add_argument("--write-docs", action="store_true", help="write the figures to docs/reliability.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this file")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the logs, producer records and database (not an embedded one) of the run",
    )
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
    return ChaosConfig(
        seconds=max(5, args.seconds),
        seed=seed,
        messages=max(100, args.messages),
        faults=bool(args.faults),
        workers=max(2, args.workers),
        producers=max(1, args.producers),
        accounts=args.accounts,
        poison=max(0, args.poison),
        drain_timeout_s=args.drain_timeout,
        write_docs=args.write_docs,
        json_out=args.json,
        keep=args.keep,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m harness.chaos [options]``; ``produce SPEC`` is the producer process."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["produce"]:
        return produce(json.loads(Path(argv[1]).read_text()))
    if argv[:1] == ["schedule"]:
        return schedule(json.loads(Path(argv[1]).read_text()))
    return run_chaos(_config_from_args(argv))
