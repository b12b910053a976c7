"""The soak's flatness verdict: a trend over thirds of the run, not one noisy window."""

from __future__ import annotations

from harness.chaos import soak_verdict as _soak_verdict


def _windows(p50s, p99s, rss=None):
    rss = rss or [80.0] * len(p50s)
    return [{"p50_ms": a, "p99_ms": b, "rss_mib": r} for a, b, r in zip(p50s, p99s, rss, strict=True)]


def test_one_stalled_window_at_the_end_is_not_a_trend():
    flat = _soak_verdict(_windows([20] * 9, [200, 180, 220, 210, 190, 200, 230, 210, 1300]))
    assert flat == (True, True)


def test_latency_that_grows_over_the_run_is_not_flat():
    latency, memory = _soak_verdict(_windows([20, 20, 20, 40, 60, 80, 90, 95, 100], [200] * 9))
    assert not latency and memory


def test_a_growing_p99_is_not_flat():
    latency, _ = _soak_verdict(_windows([20] * 9, [200, 200, 200, 400, 500, 600, 700, 800, 900]))
    assert not latency


def test_memory_that_grows_is_not_flat():
    _, memory = _soak_verdict(_windows([20] * 6, [200] * 6, rss=[80, 85, 90, 95, 100, 110]))
    assert not memory
