"""Figures shared by the chaos run and the bench: a percentile and the machine a run ran on."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path

__all__ = ["describe_machine", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank; NaN when there is none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def describe_machine(*, postgresql: str, redis: str) -> dict[str, str]:
    """CPUs, RAM, OS, Python and Dramatiq of this machine, with the given PostgreSQL and Redis descriptions."""
    import dramatiq

    mem_kib = 0
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": f"{os.cpu_count()} ({model})",
        "ram": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgresql": postgresql,
        "redis": redis,
        "dramatiq": dramatiq.__version__,
    }
