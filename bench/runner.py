"""``make bench`` (``python -m bench``): the project against the limit, the broker and a naive worker.

A run, on one machine, everything measured at the same worker concurrency
(``BENCH_PROCESSES`` x ``BENCH_THREADS``, 2 x 16, the default of `billing worker`):

1. **Services.**  PostgreSQL: the server of ``BILLING_DATABASE_URL``, else an
   EMBEDDED one (:mod:`harness.services`), marked as such in the
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
   * ``mixed``: all four kinds through ``billing worker``;
   * ``naive_mixed``: the same mix through plain Dramatiq + asyncpg actors
     (:mod:`bench.naive_mixed`), unsigned;
   * ``mixed_limit``: pgbench running the four kinds' money-path statements
     (``bench/mixed_limit/``, :mod:`bench.mixed_script`), a quarter each;
   * ``naive_usage`` and ``usage``: usage events, naive and through ``billing worker``.

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

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from harness.figures import describe_machine
from harness.services import interrupt_on_sigterm

from . import NAIVE_MIXED_QUEUE, NAIVE_QUEUE, NAIVE_USAGE_QUEUE, NOOP_QUEUE
from .config import (
    ARTIFACTS,
    BILLING_QUEUES,
    MIN_BATCH,
    ROOT,
    SETUPS,
    BenchConfig,
    config_dict,
    config_from_args,
)
from .data import create_bench_data
from .measure import Bench, Measurement
from .mixed_script import SCRIPT_DIR as MIXED_SCRIPT_DIR
from .renewal_script import SCRIPT_PATH
from .services import Services, bench_database, bench_services, cpu_cores, cpu_snapshot, pending_messages

__all__ = ["BenchConfig", "SETUPS", "config_from_args", "cpu_cores", "cpu_snapshot", "main", "run_bench"]


def run_bench(cfg: BenchConfig, console: Console | None = None) -> int:
    """Run the bench as configured; print the table; return the exit status (0: every setup passed)."""
    from . import report

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    workdir = Path(tempfile.mkdtemp(prefix="billing-bench-"))
    restore_sigterm = interrupt_on_sigterm()
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
                bench.redis, [*BILLING_QUEUES, NOOP_QUEUE, NAIVE_QUEUE, NAIVE_USAGE_QUEUE, NAIVE_MIXED_QUEUE]
            ):
                raise RuntimeError("the configured Redis holds billing messages: use an empty Redis database")
            stale_mixed = [
                path.name
                for path in bench.mixed_scripts
                if not (MIXED_SCRIPT_DIR / path.name).exists()
                or (MIXED_SCRIPT_DIR / path.name).read_text() != path.read_text()
            ]
            if stale_mixed:
                console.print(
                    f"[yellow]bench/mixed_limit/ is stale ({', '.join(stale_mixed)}; db/sql changed): the run uses "
                    "the regenerated scripts; `python -m bench.mixed_script --write` updates the files[/yellow]"
                )
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
        restore_sigterm()
        if ok and not cfg.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            console.print(f"logs kept in {workdir}")
    return 0 if ok else 1


def _run(bench: Bench, cfg: BenchConfig, console: Console) -> dict[str, Any]:
    services = bench.services
    results: dict[str, Any] = {"run": bench.run, "config": config_dict(cfg), "services": asdict(services)}
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
            shift = (round_no - 1) % len(cfg.setups)
            order = cfg.setups[shift:] + cfg.setups[:shift]
            console.print(f"[bold]round {round_no}/{cfg.rounds}[/bold]: {', '.join(order)}")
            for setup in order:
                m = bench.measure(setup, round_no, db_url)
                if m.rate is not None:
                    console.print(
                        f"  {setup:8s} {m.rate:10,.0f} /s  ({m.messages:,} in {m.seconds:.1f} s; "
                        f"cores: {_cores_text(m.cpu)}; audit {m.audit})"
                    )
                if m.extra.get("outcomes"):
                    console.print(
                        "           " + ", ".join(f"{k} {v:,}" for k, v in m.extra["outcomes"].items())
                    )

        project_rate = _median([m.rate for m in bench.measurements if m.setup == "project" and m.ok])
        usage_rate = _median([m.rate for m in bench.measurements if m.setup == "usage" and m.ok])
        for kind, setup, peak, key in (
            ("renew", "project", project_rate, "latency"),
            ("usage", "usage", usage_rate, "usage_latency"),
        ):
            pace = cfg.latency_rate or (peak or 0) / 2
            if not (cfg.latency and pace):
                continue
            told = "as asked" if cfg.latency_rate else "at half the peak"
            console.print(f"latency: {kind} paced {told}, {pace:,.0f} messages/s")
            try:
                results[key] = lat = bench.latency(db_url, pace, setup)
                console.print(
                    f"  p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, {lat['completed']:,} messages"
                )
            except Exception as exc:  # noqa: BLE001 - reported; the run goes on
                bench.failures.append(f"{key}: {type(exc).__name__}: {exc}")
                console.print(f"[red bold]{kind} latency FAILED: {exc}[/red bold]")

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
    machine = describe_machine(
        postgresql=f"{services.pg_version} ({services.pg_label})",
        redis=f"{services.redis_version} ({services.redis_label})",
    )
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


def _save(results: dict[str, Any], cfg: BenchConfig, bench: Bench, workdir: Path, console: Console) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=str)
    (ARTIFACTS / f"result-{bench.run}.json").write_text(text)
    (workdir / "result.json").write_text(text)
    if cfg.json_out:
        cfg.json_out.write_text(text)
    console.print(f"result: {(ARTIFACTS / f'result-{bench.run}.json').relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench [options]``."""
    return run_bench(config_from_args(sys.argv[1:] if argv is None else argv))
