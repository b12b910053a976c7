"""Auto-top-up done right: once per period, pending counts, a monthly cap, self-disable after declines.

Real Redis, a real in-process Dramatiq worker and real PostgreSQL, on the
injected clock.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

USD = 1_000_000


def _outcome(db, key):
    rows = db("SELECT result FROM idempotency_keys WHERE key = $1", key)
    assert rows, f"key {key!r} was never processed"
    return json.loads(rows[0]["result"])


def _account(balance, card, *, amount=30 * USD, threshold=1 * USD, cap=None):
    account = {
        "account_id": "a1",
        "balance_micros": balance,
        "auto_top_up_threshold_micros": threshold,
        "auto_top_up_amount_micros": amount,
        "payment_method_ref": card,
    }
    if cap is not None:
        account["auto_top_up_monthly_cap_micros"] = cap
    return account


def test_two_short_renewals_trigger_one_top_up_and_both_continue_exactly_once(
    setup, producer, drain, db, clock, run_scheduler
):
    # threshold 0: only a short balance triggers a top-up
    setup(
        accounts=[_account(20 * USD, "pm_card_visa", threshold=0)],
        plans=[{"plan_id": p, "price_micros": 10 * USD} for p in ("p1", "p2")],
    )
    for p in ("p1", "p2"):
        producer.subscribe(account_id="a1", plan_id=p, idempotency_key=f"s-{p}")
    drain()
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 0}]
    assert db("SELECT count(*) AS n FROM top_up_attempts") == [{"n": 0}]
    clock.set(datetime(2026, 2, 28, 12, tzinfo=UTC))
    run_scheduler()
    run_scheduler()  # a second pass while the top-up may be pending triggers nothing more
    drain()
    # both renewals found the balance short: one top-up for the period, both continued after it
    assert db("SELECT billing_period, status FROM top_up_attempts") == [
        {"billing_period": "2026-02", "status": "succeeded"}
    ]
    assert db("SELECT calls FROM fake_provider_charges") == [{"calls": 1}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 2}]
    assert sorted(r["status"] for r in db("SELECT status FROM subscriptions")) == ["active", "active"]
    renewals = [r["result"] for r in db("SELECT result FROM idempotency_keys WHERE kind = 'renew'")]
    assert sorted(json.loads(r)["outcome"] for r in renewals) == ["renewed", "renewed"]
    assert db("SELECT * FROM funds_waits") == []
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 10 * USD}]  # 0 + 30 - 20


def test_declined_top_up_sends_the_renewal_past_due_not_canceled(
    setup, producer, drain, db, clock, run_scheduler
):
    setup(
        accounts=[_account(10 * USD, "pm_decline_card")], plans=[{"plan_id": "pro", "price_micros": 10 * USD}]
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s1")
    drain()
    clock.set(datetime(2026, 2, 28, 12, tzinfo=UTC))
    run_scheduler()
    drain()
    sub = db("SELECT id, status FROM subscriptions")[0]
    assert sub["status"] == "past_due"
    assert _outcome(db, f"renew:{sub['id']}:2026-02-28T12:00:00Z")["outcome"] == "past_due"
    assert [r["status"] for r in db("SELECT status FROM top_up_attempts ORDER BY created_at")] == [
        "declined",
        "declined",
    ]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 0}]


def test_three_consecutive_declines_switch_auto_top_up_off_and_say_so(setup, producer, drain, db, clock):
    setup(accounts=[_account(0, "pm_decline_card")])
    for month in (1, 2, 3, 4):
        clock.set(datetime(2026, month, 10, tzinfo=UTC))
        producer.auto_top_up(account_id="a1", idempotency_key=f"t{month}", reason="low_balance")
        drain()
    outcomes = [_outcome(db, f"t{m}") for m in (1, 2, 3, 4)]
    assert [o["outcome"] for o in outcomes] == ["declined", "declined", "declined", "auto_top_up_disabled"]
    assert [o.get("auto_top_up_disabled") for o in outcomes[:3]] == [False, False, True]
    assert outcomes[3]["reason"] == "disabled after 3 consecutive declined top-ups"
    account = db(
        "SELECT auto_top_up_enabled, auto_top_up_consecutive_declines, auto_top_up_disabled_reason,"
        " auto_top_up_disabled_at FROM accounts"
    )[0]
    assert account["auto_top_up_enabled"] is False
    assert account["auto_top_up_consecutive_declines"] == 3
    assert account["auto_top_up_disabled_reason"] == "disabled after 3 consecutive declined top-ups"
    assert account["auto_top_up_disabled_at"] == datetime(2026, 3, 10, tzinfo=UTC)
    assert db("SELECT count(*) AS n FROM fake_provider_charges") == [{"n": 3}]  # no fourth card charge


def test_a_success_resets_the_decline_count(setup, producer, drain, db, clock, services):
    import asyncio

    from db import money
    from db.engine import make_engine, transaction

    setup(accounts=[_account(0, "pm_decline_card")])
    clock.set(datetime(2026, 1, 10, tzinfo=UTC))
    producer.auto_top_up(account_id="a1", idempotency_key="t1", reason="low_balance")
    drain()

    async def new_card():
        engine = make_engine(services.database_url, pool_size=1)
        try:
            async with transaction(engine) as conn:
                await money.configure_auto_top_up(
                    conn, account_id="a1", now=clock.now(), payment_method_ref="pm_card_visa"
                )
        finally:
            await engine.dispose()

    asyncio.run(new_card())
    clock.set(datetime(2026, 2, 10, tzinfo=UTC))
    producer.auto_top_up(account_id="a1", idempotency_key="t2", reason="low_balance")
    drain()
    assert _outcome(db, "t2")["outcome"] == "topped_up"
    assert db("SELECT auto_top_up_consecutive_declines AS n, auto_top_up_enabled AS on FROM accounts") == [
        {"n": 0, "on": True}
    ]


def test_monthly_cap_counts_the_month_s_earlier_top_ups(setup, producer, drain, db, clock, monkeypatch):
    from dataclasses import replace

    from workers import actors

    service = actors.get_service()
    monkeypatch.setattr(service, "policy", replace(service.policy, top_ups_per_period=3))
    setup(accounts=[_account(0, "pm_card_visa", amount=30 * USD, cap=50 * USD)])
    clock.set(datetime(2026, 3, 1, tzinfo=UTC))
    producer.auto_top_up(account_id="a1", idempotency_key="t1", reason="first")
    drain()
    producer.auto_top_up(account_id="a1", idempotency_key="t2", reason="second")
    producer.auto_top_up(account_id="a1", idempotency_key="t3", amount_micros=20 * USD, reason="fits")
    drain()
    assert _outcome(db, "t1")["outcome"] == "topped_up"
    # 30 + 30 > 50 is refused, 30 + 20 fits; in either order, one runs and one is refused
    assert {_outcome(db, "t2")["outcome"], _outcome(db, "t3")["outcome"]} == {"cap_reached", "topped_up"}
    assert db("SELECT count(*) AS n, sum(amount_micros)::bigint AS s FROM fake_provider_charges") == [
        {"n": 2, "s": 50 * USD}
    ]
    # next month the cap starts again
    clock.set(datetime(2026, 4, 1, tzinfo=UTC))
    producer.auto_top_up(account_id="a1", idempotency_key="t4", reason="april")
    drain()
    assert _outcome(db, "t4")["outcome"] == "topped_up"


def test_monthly_cap_is_checked_before_the_provider_is_called(setup, producer, drain, db, clock):
    setup(accounts=[_account(0, "pm_card_visa", amount=30 * USD, cap=50 * USD)])
    clock.set(datetime(2026, 3, 1, tzinfo=UTC))
    producer.auto_top_up(account_id="a1", idempotency_key="t1", amount_micros=60 * USD, reason="over the cap")
    drain()
    result = _outcome(db, "t1")
    assert result["outcome"] == "cap_reached"
    assert (result["monthly_cap_micros"], result["amount_micros"]) == (50 * USD, 60 * USD)
    assert db("SELECT count(*) AS n FROM fake_provider_charges") == [{"n": 0}]
    assert db("SELECT count(*) AS n FROM top_up_attempts") == [{"n": 0}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 0}]


def test_a_cap_below_one_top_up_is_refused_as_a_misconfiguration(setup):
    import sqlalchemy.exc

    try:
        setup(accounts=[_account(0, "pm_card_visa", amount=30 * USD, cap=20 * USD)])
    except sqlalchemy.exc.IntegrityError as exc:
        assert "accounts_top_up_cap_covers_amount" in str(exc)
    else:
        raise AssertionError("an account whose cap is below one top-up was created")
