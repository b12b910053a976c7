"""``billing demo --months``: the renewal scheduler on an accelerated clock, a table per month, the audit."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

#: Column order of the monthly table (harness.demo_months_report.MONTHLY_COLUMNS), after ``month``.
COLUMNS = ("new", "react.", "renewed", "top-ups", "declined", "past_due", "recovered", "cancel@end", "unpaid")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("│").split("│")]


def test_demo_months_renews_duns_cancels_and_passes_its_audit(services, db):
    env = {**os.environ, "BILLING_REDIS_URL": services.redis_db(2)}
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "demo", "--months", "2", "--accounts", "30"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "audit passed" in result.stdout

    # one row per simulated calendar month (the window starts on 2026-01-01 in an empty database), and a total
    rows = {cells[0]: cells[1:] for cells in map(_cells, result.stdout.splitlines()) if len(cells) > 10}
    assert {"2026-01", "2026-02", "total"} <= set(rows), result.stdout
    assert "2026-03" not in rows
    total = dict(zip(COLUMNS, (int(v.replace(",", "")) for v in rows["total"]), strict=False))

    # the database agrees with the table, and the seeded workload went through the whole lifecycle
    renewals = db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'")[0]["n"]
    assert renewals > 0
    assert total["renewed"] == renewals
    assert total["new"] == 30
    went_past_due = db(
        "SELECT count(*) AS n FROM idempotency_keys WHERE kind = 'renew' AND result->>'outcome' = 'past_due' "
        "AND (result->>'dunning_attempts')::int = 0"
    )[0]["n"]
    assert went_past_due >= 1
    assert total["past_due"] == went_past_due
    canceled = {
        r["cancel_reason"]: r["n"]
        for r in db(
            "SELECT cancel_reason, count(*) AS n FROM subscriptions WHERE status = 'canceled' GROUP BY 1"
        )
    }
    assert sum(canceled.values()) >= 1
    assert (total["cancel@end"], total["unpaid"]) == (
        canceled.get("canceled_at_period_end", 0),
        canceled.get("unpaid_after_grace", 0),
    )
    # canceled subscriptions lost their managed keys; every charge was paid for from a non-negative balance
    assert not db(
        "SELECT 1 FROM api_keys k JOIN subscriptions s ON s.id = k.subscription_id "
        "WHERE s.status = 'canceled' AND k.status = 'active'"
    )
    assert not db("SELECT 1 FROM accounts WHERE balance_micros < 0")
