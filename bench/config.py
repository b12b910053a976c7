"""The bench's configuration: :class:`BenchConfig` from options, ``BENCH_*`` variables and defaults."""

from __future__ import annotations

import argparse
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.services import BILLING_QUEUES

__all__ = ["BILLING_QUEUES", "BenchConfig", "SETUPS", "config_dict", "config_from_args"]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "bench"
APP_NAME = "billing-bench"

#: The setups of a round, in order of the docs (limit, broker ceiling, naive baseline, the project).
SETUPS = ("limit", "noop", "naive", "project", "mixed", "naive_mixed", "mixed_limit", "naive_usage", "usage")
#: First batch of each message setup (later rounds size it from the rate measured).
FIRST_BATCH = {
    "noop": 20_000,
    "naive": 2_000,
    "project": 2_000,
    "mixed": 2_000,
    "naive_mixed": 2_000,
    "naive_usage": 2_000,
    "usage": 5_000,
}
MIN_BATCH = 500
MAX_NOOP_BATCH = 300_000
#: Messages per pipelined enqueue.
ENQUEUE_CHUNK = 1_000


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
      latency_rate: Pace the latency runs at this rate (msg/s) instead; 0: half the peak.
      profile: An extra profiled ``renew`` run (py-spy).
      signing: Sign messages as ``docker-compose.yml`` runs them (BILLING_SIGNING_KEYS).
      setups: The setups of each round (default :data:`SETUPS`, in that order); a
        ratio whose setups were not run is not reported.
      worker_env: ``BILLING_*`` settings given to ``billing worker`` on top of
        its defaults (to measure a knob; the docs' run uses none).
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
    latency_rate: float = 0.0
    profile: bool = False
    quick: bool = False
    signing: bool = True
    seed: int = 0
    write_docs: bool = False
    json_out: Path | None = None
    keep: bool = False
    setups: tuple[str, ...] = SETUPS
    worker_env: tuple[tuple[str, str], ...] = ()

    @property
    def clients(self) -> int:
        """pgbench clients: the workers' concurrency."""
        return self.processes * self.threads


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
    parser.add_argument("--latency-rate", type=float, default=float(get("BENCH_LATENCY_RATE", "0")),
                        help="pace the latency runs at this many msg/s instead of half the measured peak, "
                        "for experiments (BENCH_LATENCY_RATE; the targets are judged at half the peak)")  # fmt: skip
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
    parser.add_argument("--setups", default=get("BENCH_SETUPS", ",".join(SETUPS)),
                        help=f"setups of each round, comma-separated (BENCH_SETUPS; default all: {','.join(SETUPS)})")  # fmt: skip
    parser.add_argument("--worker-env", action="append", default=[], metavar="BILLING_NAME=VALUE",
                        help="a setting for billing worker, repeatable (BENCH_WORKER_ENV, space-separated)")  # fmt: skip
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    setups = tuple(s.strip() for s in args.setups.split(",") if s.strip())
    unknown = sorted(set(setups) - set(SETUPS))
    if unknown or not setups:
        parser.error(f"unknown setups {unknown}: choose among {', '.join(SETUPS)}")
    worker_env = []
    for item in [*get("BENCH_WORKER_ENV", "").split(), *args.worker_env]:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("BILLING_"):
            parser.error(f"--worker-env takes BILLING_NAME=VALUE, not {item!r}")
        worker_env.append((name, value))
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
        latency_rate=max(0.0, args.latency_rate),
        profile=bool(args.profile),
        quick=quick,
        signing=not args.no_signing and get("BENCH_SIGNING", "1") not in ("0", "false"),
        seed=seed,
        write_docs=bool(args.write_docs),
        json_out=args.json,
        keep=bool(args.keep),
        setups=setups,
        worker_env=tuple(worker_env),
    )


def config_dict(cfg: BenchConfig) -> dict[str, Any]:
    """The configuration as JSON-ready values (the result file's ``config``)."""
    out = asdict(cfg)
    out["json_out"] = str(cfg.json_out) if cfg.json_out else None
    return out
