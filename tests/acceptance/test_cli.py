"""The ``billing`` console script, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def billing(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_account_and_plan_creation_then_show_json(services, db):
    assert (
        billing(
            "plan", "create", "pro", "--price-micros", "20000000", "--currency", "USD", "--interval", "month"
        ).returncode
        == 0
    )
    created = billing(
        "account",
        "create",
        "acct-1",
        "--currency",
        "USD",
        "--balance-micros",
        "30000000",
        "--auto-top-up-threshold-micros",
        "5000000",
        "--auto-top-up-amount-micros",
        "20000000",
        "--payment-method",
        "pm_card_visa",
    )
    assert created.returncode == 0, created.stderr
    shown = billing("account", "show", "acct-1", "--json")
    snapshot = json.loads(shown.stdout)
    assert snapshot["account"]["balance_micros"] == 30_000_000
    assert snapshot["account"]["auto_top_up_enabled"] is True
    assert snapshot["ledger"][0]["kind"] == "adjustment"
    assert "payment_method_ref" not in snapshot["account"]


@pytest.mark.parametrize(
    "args",
    [
        ("account", "create", "a", "--currency", "usd"),
        ("account", "create", "a", "--currency", "USD", "--balance-micros", "-1"),
        ("account", "create", "a", "--currency", "USD", "--balance-micros", "1.5"),
        ("account", "create", "a", "--currency", "USD", "--auto-top-up-amount-micros", "5"),
        ("account", "create", "a b", "--currency", "USD"),
        ("plan", "create", "p", "--price-micros", "0", "--currency", "USD", "--interval", "month"),
        ("plan", "create", "p", "--price-micros", "10", "--currency", "USD", "--interval", "week"),
        ("publish", "auto-top-up", "--account-id", "a", "--idempotency-key", "k", "--amount-micros", "-3"),
        ("publish", "renew", "--subscription-id", "s", "--period-start", "tomorrow"),
        ("publish", "revoke-key", "--reason", "r", "--idempotency-key", "k"),
        ("no-such-command",),
    ],
)
def test_bad_input_is_one_line_on_stderr_exit_2_and_writes_nothing(services, db, args):
    result = billing(*args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("billing: error: "), result.stderr
    assert db("SELECT count(*) AS n FROM accounts") == [{"n": 0}]
    assert db("SELECT count(*) AS n FROM plans") == [{"n": 0}]


def test_publish_from_the_shell_reaches_a_worker(services, db, setup, drain, broker):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 30_000_000}],
        plans=[{"plan_id": "pro", "price_micros": 20_000_000}],
    )
    out = billing(
        "publish", "subscribe", "--account-id", "a1", "--plan-id", "pro", "--idempotency-key", "cli-1"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["idempotency_key"] == "cli-1"
    drain()
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 10_000_000}]


def test_audit_passes_on_a_consistent_database_and_names_each_violation(services, db, setup):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 30_000_000}],
        plans=[{"plan_id": "pro", "price_micros": 20_000_000}],
    )
    clean = billing("audit", "--json", "--drained")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout)["ok"] is True
    # a balance written behind the ledger's back
    db("ALTER TABLE accounts DROP CONSTRAINT accounts_balance_non_negative")
    try:
        db("UPDATE accounts SET balance_micros = -1 WHERE id = 'a1'")
        broken = billing("audit", "--json")
        assert broken.returncode == 1
        violations = json.loads(broken.stdout)["violations"]
        assert violations["ledger_equals_balance"] == [
            {"account_id": "a1", "balance_micros": -1, "ledger_sum": 30_000_000}
        ]
        assert violations["no_negative_balance"] == [{"account_id": "a1", "balance_micros": -1}]
    finally:
        db("UPDATE accounts SET balance_micros = 30000000 WHERE id = 'a1'")
        db("ALTER TABLE accounts ADD CONSTRAINT accounts_balance_non_negative CHECK (balance_micros >= 0)")


def test_audit_drained_flags_work_still_in_flight(services, db, setup):
    setup(accounts=[{"account_id": "a1", "balance_micros": 0}])
    # a message being processed right now (its key claimed, within its lease, its effect not committed)
    db(
        "INSERT INTO idempotency_keys (key, kind, fingerprint, status, lease_expires_at)"
        " VALUES ('k1', 'subscribe', 'f', 'processing', now() + interval '15 minutes')"
    )
    assert billing("audit").returncode == 0  # live: work in flight is normal
    drained = billing("audit", "--json", "--drained")
    assert drained.returncode == 1
    violations = json.loads(drained.stdout)["violations"]
    assert violations["no_unfinished_keys"] == [{"key": "k1", "kind": "subscribe", "status": "processing"}]


def test_scheduler_once_enqueues_due_renewals_and_the_worker_charges_them(
    services, db, setup, producer, drain
):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 50_000_000}],
        plans=[{"plan_id": "pro", "price_micros": 20_000_000}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s1")
    drain()
    # nothing is due today; with a lead time longer than the period, the renewal is
    out = billing("scheduler", "--once")
    assert out.returncode == 0, out.stderr
    assert "enqueued 0 renewals and 0 dunning retries" in out.stdout, out.stderr
    out = billing("scheduler", "--once", "--lead-time-ms", str(32 * 86_400_000))
    assert "enqueued 1 renewals and 0 dunning retries" in out.stdout, out.stderr
    drain()
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 1}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 10_000_000}]


def test_cancel_at_period_end_credit_and_auto_top_up_settings_from_the_shell(
    services, db, setup, producer, drain
):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 50_000_000}],
        plans=[{"plan_id": "pro", "price_micros": 20_000_000}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s1")
    drain()
    sub_id = db("SELECT id FROM subscriptions")[0]["id"]
    out = billing("subscription", "cancel", sub_id)
    assert out.returncode == 0 and "ends at" in out.stdout, out.stderr
    assert db("SELECT cancel_at_period_end FROM subscriptions") == [{"cancel_at_period_end": True}]
    assert billing("subscription", "cancel", sub_id, "--undo").returncode == 0
    assert db("SELECT cancel_at_period_end FROM subscriptions") == [{"cancel_at_period_end": False}]
    assert billing("subscription", "cancel", "sub_missing").returncode == 2  # an unknown id is bad input

    for _ in range(2):  # the same payment reference credits once
        out = billing("account", "credit", "a1", "--amount-micros", "5000000", "--idempotency-key", "wire-7")
        assert out.returncode == 0, out.stderr
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 35_000_000}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE idempotency_key = 'credit:wire-7'") == [
        {"n": 1}
    ]

    bad = billing("account", "auto-top-up", "a1", "--enable")  # no card, amount or threshold yet
    assert bad.returncode == 2 and "needs a threshold" in bad.stderr
    out = billing(
        "account",
        "auto-top-up",
        "a1",
        "--enable",
        "--threshold-micros",
        "1000000",
        "--amount-micros",
        "9000000",
        "--payment-method",
        "pm_card_visa",
        "--monthly-cap-micros",
        "20000000",
    )
    assert out.returncode == 0, out.stderr
    assert db("SELECT auto_top_up_enabled AS on, auto_top_up_monthly_cap_micros AS cap FROM accounts") == [
        {"on": True, "cap": 20_000_000}
    ]


def test_audit_names_a_projection_or_past_due_state_out_of_step(services, db, setup, producer, drain):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 30_000_000}],
        plans=[{"plan_id": "pro", "price_micros": 20_000_000}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s1")
    drain()
    assert billing("audit").returncode == 0
    # a projection written outside the effect's transaction, and a past_due with no retry
    db("UPDATE entitlements SET entitled = false")
    db("UPDATE subscriptions SET status = 'past_due'")
    out = billing("audit", "--json")
    assert out.returncode == 1
    violations = json.loads(out.stdout)["violations"]
    assert [v["projected"] for v in violations["entitlement_matches_subscription"]] == ["active"]
    assert [v["status"] for v in violations["past_due_state_complete"]] == ["past_due"]


def test_audit_names_a_renewal_whose_charge_is_not_the_period_it_names(services, db, setup, producer, drain):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 50_000_000}],
        plans=[{"plan_id": "pro", "price_micros": 20_000_000}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s1")
    drain()
    sub = db("SELECT id, current_period_end FROM subscriptions")[0]
    producer.renew(subscription_id=sub["id"], period_start=sub["current_period_end"], idempotency_key="r1")
    drain()
    assert billing("audit").returncode == 0
    # the outcome names another period than the one the ledger charged (the ledger itself is append-only)
    db(
        "UPDATE idempotency_keys SET result = jsonb_set(result, '{period_start}', '\"2030-01-01T00:00:00+00:00\"')"
        " WHERE key = 'r1'"
    )
    out = billing("audit", "--json")
    assert out.returncode == 1
    assert json.loads(out.stdout)["violations"]["outcome_matches_ledger"] == [
        {"key": "r1", "kind": "renew", "outcome": "renewed"}
    ]
