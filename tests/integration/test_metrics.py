"""Billing metrics from the in-process worker: each event moves its counter by exactly one.

The session's worker runs in this process without Dramatiq's process boot,
so the metrics are prometheus_client's in-memory ones (no multiprocess
directory), read from the billing registry.  They are process-global: each
test compares values before and after.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from workers import metrics
from workers.settings import Settings

USD = 1_000_000


def _value(name: str, **labels: str) -> float:
    return metrics.get_billing_metrics().registry.get_sample_value(name, labels) or 0.0


SERIES: list[tuple[str, dict[str, str]]] = [
    ("billing_charges_total", {"kind": "subscription_charge"}),
    ("billing_charges_total", {"kind": "renewal_charge"}),
    ("billing_charged_micros_total", {"kind": "subscription_charge"}),
    ("billing_charged_micros_total", {"kind": "renewal_charge"}),
    ("billing_duplicates_suppressed_total", {"actor": "subscribe"}),
    ("billing_duplicates_suppressed_total", {"actor": "renew"}),
    ("billing_idempotency_conflicts_total", {"actor": "subscribe"}),
    ("billing_failures_total", {"actor": "subscribe", "error": "idempotency_conflict"}),
    ("billing_outcomes_total", {"actor": "subscribe", "outcome": "subscribed"}),
    ("billing_outcomes_total", {"actor": "renew", "outcome": "renewed"}),
    ("billing_enqueue_to_commit_seconds_count", {"actor": "subscribe"}),
    ("billing_enqueue_to_commit_seconds_count", {"actor": "renew"}),
    ("billing_top_ups_total", {"status": "succeeded"}),
    ("billing_top_ups_total", {"status": "declined"}),
    ("billing_top_ups_total", {"status": "limit_reached"}),
    ("billing_top_ups_total", {"status": "not_configured"}),
    ("billing_revocations_total", {}),
    ("billing_outcomes_total", {"actor": "revoke_key", "outcome": "revoked"}),
    ("billing_enqueue_to_commit_seconds_count", {"actor": "auto_top_up"}),
    ("billing_enqueue_to_commit_seconds_count", {"actor": "revoke_key"}),
]


def _snapshot() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(name, tuple(sorted(labels.items()))): _value(name, **labels) for name, labels in SERIES}


def _deltas(before: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    """Series that moved, as ``name{k=v,...}`` -> increase."""
    moved = {}
    for key, after in _snapshot().items():
        if after != before[key]:
            name, labels = key
            moved[name + "{" + ",".join(f"{k}={v}" for k, v in labels) + "}"] = after - before[key]
    return moved


def test_subscribe_duplicate_conflict_and_renew_move_their_counters_once(setup, producer, drain, db):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 50 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}, {"plan_id": "lite", "price_micros": 5 * USD}],
    )
    before = _snapshot()
    latency_sum = _value("billing_enqueue_to_commit_seconds_sum", actor="subscribe")
    within_60s = _value("billing_enqueue_to_commit_seconds_bucket", actor="subscribe", le="60.0")
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")  # duplicate
    drain()
    producer.subscribe(account_id="a1", plan_id="lite", idempotency_key="k1")  # conflict
    drain()
    sub = db("SELECT id, current_period_end FROM subscriptions")[0]
    period = sub["current_period_end"]
    producer.renew(subscription_id=sub["id"], period_start=period, idempotency_key="r1")
    drain()

    assert _deltas(before) == {
        "billing_charges_total{kind=subscription_charge}": 1,
        "billing_charges_total{kind=renewal_charge}": 1,
        "billing_charged_micros_total{kind=subscription_charge}": 20 * USD,
        "billing_charged_micros_total{kind=renewal_charge}": 20 * USD,
        "billing_duplicates_suppressed_total{actor=subscribe}": 1,
        "billing_idempotency_conflicts_total{actor=subscribe}": 1,
        "billing_failures_total{actor=subscribe,error=idempotency_conflict}": 1,
        "billing_outcomes_total{actor=subscribe,outcome=subscribed}": 1,
        "billing_outcomes_total{actor=renew,outcome=renewed}": 1,
        # one observation per commit: none for the duplicate or the conflict
        "billing_enqueue_to_commit_seconds_count{actor=subscribe}": 1,
        "billing_enqueue_to_commit_seconds_count{actor=renew}": 1,
    }
    observed_s = _value("billing_enqueue_to_commit_seconds_sum", actor="subscribe") - latency_sum
    assert 0 < observed_s < 60
    # the one observation fell in the 60 s bucket (the counters are process-global: compare, not >= 1)
    assert _value("billing_enqueue_to_commit_seconds_bucket", actor="subscribe", le="60.0") - within_60s == 1


def test_top_ups_and_revocations_are_counted_by_status_and_keys(setup, producer, drain, db):
    card = {"auto_top_up_threshold_micros": 1 * USD, "auto_top_up_amount_micros": 10 * USD}
    setup(
        accounts=[
            {"account_id": "a1", "balance_micros": 0, **card, "payment_method_ref": "pm_card_visa"},
            {"account_id": "a2", "balance_micros": 0, **card, "payment_method_ref": "pm_decline"},
            {"account_id": "a3", "balance_micros": 0},
            {"account_id": "a4", "balance_micros": 30 * USD},
        ],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    producer.subscribe(account_id="a4", plan_id="pro", idempotency_key="s4")
    drain()
    before = _snapshot()
    producer.auto_top_up(account_id="a1", idempotency_key="t1", reason="manual")
    producer.auto_top_up(account_id="a2", idempotency_key="t2", reason="manual")
    producer.auto_top_up(account_id="a3", idempotency_key="t3", reason="manual")
    drain()
    producer.auto_top_up(account_id="a1", idempotency_key="t4", reason="manual")  # one per period
    subscription_id = db("SELECT id FROM subscriptions")[0]["id"]
    producer.revoke_key(subscription_id=subscription_id, reason="test", idempotency_key="v1")
    drain()

    assert _deltas(before) == {
        "billing_top_ups_total{status=succeeded}": 1,
        "billing_top_ups_total{status=declined}": 1,
        "billing_top_ups_total{status=not_configured}": 1,
        "billing_top_ups_total{status=limit_reached}": 1,
        "billing_revocations_total{}": 1,
        "billing_outcomes_total{actor=revoke_key,outcome=revoked}": 1,
        "billing_enqueue_to_commit_seconds_count{actor=auto_top_up}": 4,
        "billing_enqueue_to_commit_seconds_count{actor=revoke_key}": 1,
    }


def test_a_failing_metric_never_fails_the_caller():
    before = _snapshot()
    failures = _value("billing_failures_total", actor="subscribe", error="RuntimeError")
    metrics.effect_committed("subscribe", None)  # type: ignore[arg-type]  # raises inside: swallowed
    metrics.failure_recorded("subscribe", RuntimeError("boom"))
    # exactly one failure counted (the counters are process-global: compare with before, not >= 1),
    # and the broken call moved nothing
    assert _value("billing_failures_total", actor="subscribe", error="RuntimeError") - failures == 1
    assert _deltas(before) == {}


def test_the_metrics_directory_is_fresh_by_default_and_emptied_when_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    env = metrics.exposition_env(Settings(metrics_port=9299, metrics_host="127.0.0.1"))
    fresh = Path(env["dramatiq_prom_db"])
    assert fresh.parent == tmp_path.resolve() and fresh.name.startswith("billing-metrics-")
    assert env == {
        "dramatiq_prom_db": str(fresh),
        "PROMETHEUS_MULTIPROC_DIR": str(fresh),
        "dramatiq_prom_host": "127.0.0.1",
        "dramatiq_prom_port": "9299",
    }
    assert metrics.exposition_env(Settings())["dramatiq_prom_db"] != str(fresh)  # one per start

    configured = tmp_path / "metrics"
    configured.mkdir()
    for name in ("counter_123.db", "histogram_123.db", "gauge_livesum_123.db", "notes.txt", "other.db"):
        (configured / name).write_text("x")
    env = metrics.exposition_env(Settings(metrics_dir=str(configured)))
    assert env["dramatiq_prom_db"] == str(configured.resolve())
    assert sorted(p.name for p in configured.iterdir()) == ["notes.txt", "other.db"]
