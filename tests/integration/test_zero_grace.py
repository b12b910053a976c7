"""``BILLING_GRACE_PERIOD_MS=0``: an unpaid renewal cancels at once; settings are checked against each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import ROOT

USD = 1_000_000


@pytest.fixture
def zero_grace(worker):
    from db.money import BillingPolicy
    from workers import actors

    service = actors.get_service()
    previous = service.policy
    service.policy = BillingPolicy(grace_period=timedelta(0), dunning_schedule=())
    yield
    service.policy = previous


def test_an_unpaid_renewal_with_zero_grace_cancels_at_once_and_revokes(
    setup, producer, drain, db, clock, run_scheduler, services, zero_grace
):
    from tests.integration.test_lifecycle import _audit

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 15 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    clock.set(datetime(2026, 2, 28, 12, tzinfo=UTC))
    run_scheduler()
    drain()
    (row,) = db("SELECT status, result FROM idempotency_keys WHERE kind = 'renew'")
    assert (row["status"], json.loads(row["result"])["outcome"]) == ("completed", "canceled_unpaid")
    (sub,) = db("SELECT status, cancel_reason, next_retry_at FROM subscriptions")
    assert (sub["status"], sub["cancel_reason"], sub["next_retry_at"]) == (
        "canceled",
        "unpaid_after_grace",
        None,
    )
    assert db("SELECT status FROM api_keys") == [{"status": "revoked"}]
    assert db("SELECT entitled FROM entitlements") == [{"entitled": False}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 5 * USD}]
    assert not db("SELECT 1 FROM failed_messages")
    _audit(services, clock)


def test_offsets_beyond_grace_are_named_and_impossible_combinations_refused():
    from tasks.errors import ConfigurationError
    from workers.settings import Settings

    s = Settings(grace_period_ms=0)
    assert s.billing_policy().retry_offsets() == [timedelta(0)]
    (notice,) = s.notices()
    assert "BILLING_DUNNING_SCHEDULE_MS" in notice and "ignored" in notice and "at once" in notice
    assert Settings().notices() == []
    (notice,) = Settings(grace_period_ms=36 * 3_600_000).notices()
    assert "172800000" in notice and "259200000" in notice and "86400000," not in notice

    for bad, says in (
        ({"min_backoff_ms": 5_000, "max_backoff_ms": 1_000}, "BILLING_MIN_BACKOFF_MS"),
        ({"dunning_schedule_ms": [0, 86_400_000]}, "BILLING_DUNNING_SCHEDULE_MS"),
        ({"log_format": "xml"}, "BILLING_LOG_FORMAT"),
        ({"redis_url": "http://127.0.0.1:6379/0"}, "BILLING_REDIS_URL"),
        ({"database_url": "postgresql://u:p@ss@127.0.0.1/db"}, "%40"),
    ):
        with pytest.raises(ConfigurationError, match=says) as caught:
            Settings.checked(**bad)
        assert "\n" not in caught.value.message


def _billing(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_cli_says_what_it_ignores_and_refuses_an_impossible_combination_in_one_line(services):
    ok = _billing("scheduler", "--once", BILLING_GRACE_PERIOD_MS="0")
    assert ok.returncode == 0, ok.stderr
    (warning,) = ok.stderr.strip().splitlines()
    assert warning.startswith("billing: warning: ") and "ignored" in warning
    bad = _billing("scheduler", "--once", BILLING_MIN_BACKOFF_MS="5000", BILLING_MAX_BACKOFF_MS="1000")
    assert bad.returncode == 1
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("billing: error: ") and "BILLING_MAX_BACKOFF_MS" in line
    bad = _billing("ops", "failures", BILLING_GRACE_PERIOD_MS="-1")
    assert bad.returncode == 1
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("billing: error: ") and "BILLING_GRACE_PERIOD_MS" in line
