"""The bench's figures: summaries, ratios, pgbench parsing, profiles, the report (no services)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench.report import figures, markdown
from bench.stats import parse_pgbench, percentile, ratios, summarize, time_by_component, top_functions

PGBENCH_OUTPUT = """\
pgbench (18.6)
transaction type: bench/renewal.sql
scaling factor: 1
query mode: prepared
number of clients: 16
number of threads: 2
maximum number of tries: 1
duration: 10 s
number of transactions actually processed: 23456
number of failed transactions: 0 (0.000%)
latency average = 6.823 ms
initial connection time = 21.532 ms
tps = 2345.600000 (without initial connection time)
"""


def test_summary_is_median_min_max_of_what_was_measured() -> None:
    s = summarize([300.0, None, 100.0, 200.0])
    assert (s.median, s.low, s.high, s.n) == (200.0, 100.0, 300.0, 3)
    assert s.text() == "200 (100-300)"
    assert summarize([5.0]).text() == "5"
    assert summarize([None]).text() == "n/a" and math.isnan(summarize([]).median)


def test_ratios_pair_rounds() -> None:
    assert ratios([10.0, 20.0, None], [5.0, 0.0, 1.0]) == [2.0, None, None]
    with pytest.raises(ValueError):
        ratios([1.0], [1.0, 2.0])


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 51.0  # round(0.5 * 99) = 50 -> the 51st value
    assert percentile(values, 0.99) == 99.0
    assert math.isnan(percentile([], 0.5))


def test_parse_pgbench() -> None:
    r = parse_pgbench(PGBENCH_OUTPUT)
    assert (r.tps, r.transactions, r.failed, r.latency_ms, r.aborted) == (2345.6, 23456, 0, 6.823, 0)
    aborted = parse_pgbench(
        PGBENCH_OUTPUT, "pgbench: error: client 3 script 0 aborted in command 4 query 0: ERROR"
    )
    assert aborted.aborted == 1
    with pytest.raises(ValueError, match="no tps"):
        parse_pgbench("pgbench: error: connection failed")


COLLAPSED = """\
process 1:"python";thread (0x1);run (dramatiq/worker.py);handle (workers/billing.py);execute (sqlalchemy/engine/base.py) 6
process 1:"python";thread (0x1);run (dramatiq/worker.py);handle (workers/billing.py) 2
process 1:"python";thread (0x2);_run_once (asyncio/base_events.py);_process (asyncpg/protocol.py) 2
"""


def test_top_functions_and_components() -> None:
    top = top_functions(COLLAPSED)
    assert top[0] == ("execute (sqlalchemy/engine/base.py)", 0.6, 0.6)
    handle = next(t for t in top if t[0].startswith("handle"))
    assert handle[1:] == (0.2, 0.8)
    assert dict(time_by_component(COLLAPSED)) == {
        "SQLAlchemy": 0.6,
        "this project: workers/": 0.2,
        "asyncpg": 0.2,
    }
    assert top_functions("") == []


def _measurement(setup: str, round_no: int, rate: float | None, **extra: Any) -> dict[str, Any]:
    return {
        "setup": setup,
        "round": round_no,
        "processes": 2,
        "tag": extra.pop("tag", f"{setup}-r{round_no}-p2"),
        "rate": rate,
        "messages": 1000,
        "seconds": 1.0,
        "cpu": {"busy": 1.8, "workers": 1.0, "postgres": 0.6, "redis": 0.1, "pgbench": 0.0, "other": 0.1},
        "rss_kib": extra.pop("rss_kib", []),
        "audit": "-" if setup == "noop" else "passed",
        "error": "",
        "extra": {},
        "ok": rate is not None,
    }


def _result() -> dict[str, Any]:
    ms = []
    for r, (limit, naive, project) in enumerate(
        [(1000, 300, 500), (1100, 310, 600), (900, 290, 400)], start=1
    ):
        ms += [
            _measurement("limit", r, limit),
            _measurement("noop", r, 9000),
            _measurement("naive", r, naive),
            _measurement("project", r, project, rss_kib=[100_000, 110_000]),
            _measurement("mixed", r, project * 0.8),
            _measurement("naive_mixed", r, {1: 200.0, 2: 200.0, 3: 100.0}[r]),
            _measurement("mixed_limit", r, 1000.0),
        ]
    ms += [
        _measurement("project", 0, 300.0, tag="scaling-p1"),
        _measurement("project", 0, None, tag="scaling-p4"),
    ]
    return {
        "run": "abc12345",
        "finished_at": "2026-11-23 16:00 UTC",
        "elapsed_s": 600,
        "config": {
            "rounds": 3,
            "processes": 2,
            "threads": 8,
            "seconds": 10,
            "accounts": 10_000,
            "large_accounts": 0,
            "scaling": [1, 4],
            "quick": False,
            "signing": True,
            "seed": 1,
        },  # fmt: skip
        "services": {"pg_embedded": True, "pg_label": "EMBEDDED", "redis_label": "own redis-server"},
        "machine": {"cpus": "2 (AMD EPYC)"},
        "measurements": ms,
        "latency": {
            "target_rate": 250,
            "achieved_rate": 249,
            "p50_ms": 12.0,
            "p99_ms": 80.0,
            "max_ms": 95.0,
            "completed": 2500,
            "rss_kib": [120_000],
        },  # fmt: skip
        "scheduler": [
            {"due": 10_000, "seconds": 0.5, "rate": 20_000.0, "wall_s": 2.0, "rss_kib": 90_000},
            {"due": 100_000, "seconds": 4.0, "rate": 25_000.0, "wall_s": 5.5, "rss_kib": 95_000},
        ],
        "failures": [],
    }


def test_figures_and_targets_say_met_and_not_met() -> None:
    f = figures(_result())
    assert f.throughput["project"].text() == "500 (400-600)"
    assert (f.limit_ratio.median, f.limit_ratio.low, f.limit_ratio.high) == (
        0.5,
        0.4444444444444444,
        0.5454545454545454,
    )
    verdicts = {name.split(" (")[0].split(":")[0]: ok for name, _, _, ok in f.targets}
    assert verdicts["renew throughput / pgbench limit"] is False  # 0.5 < 0.6
    assert verdicts["renew throughput / naive baseline"] is False  # 500/300 < 2
    assert verdicts["p99 enqueue-to-commit latency at half the peak"] is False  # 80 ms
    assert verdicts["scheduler"] is True
    assert verdicts["worker peak RSS per process, under load"] is True  # 123 MB
    assert f.scaling == [(1, 300.0), (4, None)]


def test_mixed_over_the_naive_mixed_peer_is_paired_by_round() -> None:
    result = _result()
    f = figures(result)
    # mixed 400, 480, 320 over the peer's 200, 200, 100 in the same rounds
    assert (
        f.mixed_naive_ratio.median,
        f.mixed_naive_ratio.low,
        f.mixed_naive_ratio.high,
        f.mixed_naive_ratio.n,
    ) == (
        2.4,
        2.0,
        3.2,
        3,
    )
    verdicts = {name.split(" (")[0]: (wanted, ok) for name, wanted, _, ok in f.targets}
    assert verdicts["mixed throughput / naive mixed peer"] == (">= 2", True)
    assert "| **ratio 4m/7** (mixed / naive mixed) | **2.40 (2.00-3.20)** | 3 |" in markdown(result)
    # mixed over its pgbench limit: reported, with no target
    assert (f.mixed_limit_ratio.median, f.mixed_limit_ratio.n) == (0.4, 3)
    assert "| **ratio 4m/8** (mixed / mixed limit, no target) | **0.40 (0.32-0.48)** | 3 |" in markdown(
        result
    )
    assert not [name for name, *_ in f.targets if "mixed limit" in name]
    # a round whose peer failed pairs with nothing; the others still count
    for m in result["measurements"]:
        if m["setup"] == "naive_mixed" and m["round"] == 3:
            m.update(rate=None, ok=False)
    f = figures(result)
    assert (f.mixed_naive_ratio.median, f.mixed_naive_ratio.n) == (2.2, 2)
    assert {name.split(" (")[0]: ok for name, _, _, ok in f.targets}[
        "mixed throughput / naive mixed peer"
    ] is True
    # without the peer, no verdict
    result["measurements"] = [m for m in result["measurements"] if m["setup"] != "naive_mixed"]
    f = figures(result)
    assert f.mixed_naive_ratio.n == 0
    assert {name.split(" (")[0]: ok for name, _, _, ok in f.targets}[
        "mixed throughput / naive mixed peer"
    ] is None


def test_markdown_marks_embedded_and_not_met() -> None:
    text = markdown(_result())
    assert (
        "EMBEDDED" in text
        and "NOT MET" in text
        and "| **ratio 4/1** (renew / limit) | **0.50 (0.44-0.55)**" in text
    )


def test_chart_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.report import chart

    path = chart(_result(), tmp_path / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
