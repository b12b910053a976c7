"""Figures of a bench run: summaries over rounds, ratios, percentiles, pgbench output, profiles.

Pure functions (no services), unit-tested in ``tests/unit/test_bench_stats.py``.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from harness.figures import percentile as _percentile

__all__ = [
    "Summary",
    "summarize",
    "ratios",
    "percentile",
    "PgbenchResult",
    "parse_pgbench",
    "top_functions",
    "time_by_component",
    "COMPONENTS",
]


@dataclass(frozen=True)
class Summary:
    """Median, min and max of one figure over the rounds (NaN when there is none)."""

    median: float
    low: float
    high: float
    n: int

    def text(self, fmt: str = "{:,.0f}") -> str:
        """``median (min-max)``, or just the value for one round, or ``n/a``."""
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return fmt.format(self.median)
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}-{fmt.format(self.high)})"


def summarize(values: Iterable[float | None]) -> Summary:
    """The :class:`Summary` of the values that are not None (a failed measurement counts as none)."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        nan = float("nan")
        return Summary(nan, nan, nan, 0)
    return Summary(statistics.median(kept), min(kept), max(kept), len(kept))


def ratios(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> list[float | None]:
    """Per-round ratios (interleaved measurements of one round go together); None where either is missing."""
    out: list[float | None] = []
    for a, b in zip(numerators, denominators, strict=True):
        out.append(a / b if a is not None and b else None)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank, as ``make chaos`` reports them (NaN when empty)."""
    return _percentile(list(values), q)


@dataclass(frozen=True)
class PgbenchResult:
    """What a pgbench run printed.

    Attributes:
      tps: Transactions per second (without the initial connection time).
      transactions: Transactions processed.
      failed: Failed transactions (pgbench 15+), 0 when not printed.
      latency_ms: Average latency.
      aborted: Clients aborted by an error (pgbench prints "aborted in command").
    """

    tps: float
    transactions: int
    failed: int
    latency_ms: float
    aborted: int


def parse_pgbench(stdout: str, stderr: str = "") -> PgbenchResult:
    """Parse pgbench's summary.

    Raises:
      ValueError: No ``tps =`` line (pgbench failed before running).
    """
    tps = re.search(r"^tps = ([\d.]+)", stdout, re.M)
    if tps is None:
        raise ValueError(f"no tps in pgbench output: {(stdout + stderr)[-500:]}")
    processed = re.search(r"number of transactions actually processed: (\d+)", stdout)
    failed = re.search(r"number of failed transactions: (\d+)", stdout)
    latency = re.search(r"latency average = ([\d.]+) ms", stdout)
    return PgbenchResult(
        tps=float(tps.group(1)),
        transactions=int(processed.group(1)) if processed else 0,
        failed=int(failed.group(1)) if failed else 0,
        latency_ms=float(latency.group(1)) if latency else float("nan"),
        aborted=len(re.findall(r"aborted in command", stderr + stdout)),
    )


# ---------------------------------------------------------------------------- profiles (py-spy raw)


def _stacks(collapsed: str) -> Iterable[tuple[list[str], int]]:
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def top_functions(collapsed: str, n: int = 15) -> list[tuple[str, float, float]]:
    """The functions with the most samples of their own, from py-spy's ``--format raw`` output.

    Returns:
      ``(function, self share, inclusive share)`` for the top ``n`` by self
      share; shares of all samples, 0..1.  Inclusive counts a function once
      per stack (recursion does not inflate it).
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for frames, count in _stacks(collapsed):
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return []
    return [(f, c / total, inclusive[f] / total) for f, c in own.most_common(n)]


#: Where a sample's leaf frame lives -> component (first match wins).  py-spy names a frame
#: ``function (path/relative/to/sys.path.py)``: the needles match the start of that path.
COMPONENTS: list[tuple[str, str]] = [
    ("(workers/", "this project: workers/"),
    ("(db/", "this project: db/"),
    ("(tasks/", "this project: tasks/"),
    ("(sqlalchemy/", "SQLAlchemy"),
    ("(asyncpg/", "asyncpg"),
    ("(dramatiq/", "Dramatiq"),
    ("(redis/", "redis-py"),
    ("(structlog/", "logging (structlog)"),
    ("(logging/", "logging (structlog)"),
    ("(pydantic", "pydantic"),
    ("(asyncio/", "asyncio"),
    ("(selectors.py", "asyncio"),
    ("(json/", "json"),
    ("(threading.py", "threads"),
    ("(queue.py", "threads"),
]


def time_by_component(collapsed: str) -> list[tuple[str, float]]:
    """Share of samples by the component of their leaf frame (:data:`COMPONENTS`), largest first."""
    shares: Counter[str] = Counter()
    total = 0
    for frames, count in _stacks(collapsed):
        total += count
        leaf = frames[-1]
        shares[next((name for needle, name in COMPONENTS if needle in leaf), "other (stdlib, C)")] += count
    return [(name, c / total) for name, c in shares.most_common()] if total else []
