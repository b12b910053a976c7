"""An early renewal that cannot be paid never cuts the paid period short (found by ``make chaos``, seed 20260501).

Before the fix, a ``renew`` for the next period published ahead of time
(a producer, or ``BILLING_RENEWAL_LEAD_MS``) on a short balance with no
top-up coming sent the subscription ``past_due`` at once, with its grace
measured from then: the chaos run saw monthly subscriptions paid until
2027-01-01 canceled ``unpaid_after_grace`` on 2026-12-05.  Now it decides
nothing before period end (outcome ``insufficient_funds_before_period_end``,
key forgotten), and past_due and grace start at period end.
"""

from __future__ import annotations

import json
from datetime import timedelta

USD = 1_000_000


def test_an_early_unpaid_renewal_decides_nothing_before_period_end(
    setup, producer, drain, db, clock, run_scheduler, services
):
    from db.money import BillingPolicy
    from tests.integration.test_lifecycle import _audit

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 20 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    (sub,) = db("SELECT id, current_period_end FROM subscriptions")
    period_end = sub["current_period_end"]
    # a producer renews the next period ten days early, on an empty balance
    clock.set(period_end - timedelta(days=10))
    producer.renew(subscription_id=sub["id"], period_start=period_end, idempotency_key="early")
    drain()
    (after,) = db("SELECT status, past_due_since, grace_ends_at, current_period_end FROM subscriptions")
    assert (after["status"], after["past_due_since"], after["grace_ends_at"]) == ("active", None, None)
    assert after["current_period_end"] == period_end
    assert db("SELECT entitled, status FROM entitlements") == [{"entitled": True, "status": "active"}]
    assert not db(
        "SELECT 1 FROM idempotency_keys WHERE key = 'early'"
    )  # forgotten: asked again, decided then
    _audit(services, clock)
    # the scheduler's due scan, an hour after period end: past_due only now, grace from now
    clock.set(period_end + timedelta(hours=1))
    run_scheduler()
    drain()
    (due,) = db("SELECT status, past_due_since, grace_ends_at FROM subscriptions")
    assert due["status"] == "past_due"
    assert due["past_due_since"] == clock.now()
    assert due["grace_ends_at"] == clock.now() + BillingPolicy().grace_period
    (row,) = db("SELECT result FROM idempotency_keys WHERE kind = 'renew'")
    assert json.loads(row["result"])["outcome"] == "past_due"
    # the same early key delivered again now (it was forgotten) is decided now: past_due already
    producer.renew(subscription_id=sub["id"], period_start=period_end, idempotency_key="early")
    drain()
    (again,) = db("SELECT status, result FROM idempotency_keys WHERE key = 'early'")
    assert again["status"] == "completed"
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 0}]
