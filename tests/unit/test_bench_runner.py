"""The bench runner's configuration and /proc accounting (no services)."""

from __future__ import annotations

import os

from bench.runner import config_from_args, cpu_cores, cpu_snapshot


def test_defaults_and_quick_mode() -> None:
    full = config_from_args([], {})
    assert (full.rounds, full.processes, full.threads, full.seconds) == (3, 2, 16, 10.0)
    assert (full.accounts, full.large_accounts, full.scaling, full.clients) == (
        10_000,
        1_000_000,
        (1, 2, 4),
        32,
    )
    quick = config_from_args([], {"BENCH_QUICK": "1"})
    assert (quick.rounds, quick.seconds, quick.large_accounts, quick.scaling) == (1, 5.0, 0, ())
    assert quick.scheduler_due == (10_000, 100_000)


def test_variables_and_options() -> None:
    env = {"BENCH_ROUNDS": "5", "BENCH_PROCESSES": "4", "BENCH_SCALING": "", "BENCH_SEED": "7"}
    cfg = config_from_args(["--threads", "4", "--scheduler-due", "1000, 5000"], env)
    assert (cfg.rounds, cfg.processes, cfg.threads, cfg.scaling, cfg.seed) == (5, 4, 4, (), 7)
    assert cfg.scheduler_due == (1_000, 5_000) and cfg.signing
    assert not config_from_args(["--no-signing"], {}).signing


def test_cpu_accounting_counts_this_process() -> None:
    before = cpu_snapshot({os.getpid()})
    sum(i * i for i in range(2_000_000))
    after = cpu_snapshot({os.getpid()})
    assert after["workers"] > before["workers"]
    cores = cpu_cores(before, after, 1.0)
    assert (
        cores["workers"] > 0 and cores["busy"] > 0
    )  # two clocks (/proc/stat, the process's ticks): no exact order
    assert cores["other"] >= 0
