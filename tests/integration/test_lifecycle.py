"""Subscription lifecycle on an injected clock: the scheduler, cancel at period end, past_due, grace, dunning.

Real Redis, a real in-process Dramatiq worker and real PostgreSQL; the
``clock`` fixture is the worker's clock, moved by the test, so months pass
in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

USD = 1_000_000
DAY = timedelta(days=1)


def _outcome(db, key):
    rows = db("SELECT status, result FROM idempotency_keys WHERE key = $1", key)
    assert rows, f"key {key!r} was never processed"
    return json.loads(rows[0]["result"])["outcome"]


def _sub(db):
    rows = db("SELECT * FROM subscriptions ORDER BY created_at")
    assert len(rows) == 1
    return rows[0]


def _charges(db):
    return [
        (r["kind"], r["period_start"], r["amount_micros"])
        for r in db(
            "SELECT kind, period_start, amount_micros FROM ledger_entries "
            "WHERE kind IN ('subscription_charge', 'renewal_charge') ORDER BY id"
        )
    ]


def _entitlement(db):
    # the read path of other services: one plain SELECT on a plain table
    return db("SELECT status, entitled, current_period_end, grace_ends_at FROM entitlements")


def _money(services, fn):
    from db.engine import make_engine, transaction

    async def run():
        engine = make_engine(services.database_url, pool_size=1)
        try:
            async with transaction(engine) as conn:
                return await fn(conn)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _utc(*args):
    return datetime(*args, tzinfo=UTC)


def _audit(services, clock):
    from db.audit import run_audit
    from db.engine import make_engine

    async def run():
        engine = make_engine(services.database_url, pool_size=1)
        try:
            # deadlines are measured on the test's clock, not PostgreSQL's
            return await run_audit(engine, quiescent=True, now=clock.now())
        finally:
            await engine.dispose()

    report = asyncio.run(run())
    assert report.ok, report.violations


def test_monthly_anchor_on_jan_31_renews_feb_28_then_mar_31(setup, producer, drain, db, clock, run_scheduler):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    assert _sub(db)["current_period_end"] == _utc(2026, 2, 28, 12)

    # not due yet: a pass the day before enqueues nothing
    clock.set(_utc(2026, 2, 27, 12))
    assert run_scheduler().enqueued == 0
    clock.set(_utc(2026, 2, 28, 12))
    assert run_scheduler().renewals == 1
    drain()
    sub = _sub(db)
    assert _outcome(db, f"renew:{sub['id']}:2026-02-28T12:00:00Z") == "renewed"
    assert (sub["current_period_start"], sub["current_period_end"]) == (
        _utc(2026, 2, 28, 12),
        _utc(2026, 3, 31, 12),
    )
    clock.set(_utc(2026, 3, 31, 12, 0, 1))
    run_scheduler()
    drain()
    assert _sub(db)["current_period_end"] == _utc(2026, 4, 30, 12)
    assert [c[1] for c in _charges(db)] == [
        _utc(2026, 1, 31, 12),
        _utc(2026, 2, 28, 12),
        _utc(2026, 3, 31, 12),
    ]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 70 * USD}]


def test_leap_year_renews_on_feb_29(setup, producer, drain, db, clock, run_scheduler):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    clock.set(_utc(2028, 1, 31))
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    assert _sub(db)["current_period_end"] == _utc(2028, 2, 29)
    clock.set(_utc(2028, 2, 29))
    run_scheduler()
    drain()
    assert _sub(db)["current_period_end"] == _utc(2028, 3, 31)


def test_lead_time_renews_before_period_end(setup, producer, drain, db, clock, run_scheduler):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    clock.set(_utc(2026, 2, 28, 11))
    assert run_scheduler(lead_time=timedelta(minutes=30)).enqueued == 0
    assert run_scheduler(lead_time=timedelta(hours=1)).renewals == 1
    drain()
    assert _sub(db)["current_period_end"] == _utc(2026, 3, 31, 12)


def test_cancel_at_period_end_cancels_without_charge_and_revokes_managed_keys_only(
    setup, producer, drain, db, clock, run_scheduler, services
):
    from db import money

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    sub_id = _sub(db)["id"]
    user_key = _money(services, lambda c: money.create_user_key(c, account_id="a1", now=clock.now()))
    _money(
        services,
        lambda c: money.set_cancel_at_period_end(c, subscription_id=sub_id, cancel=True, now=clock.now()),
    )
    assert _entitlement(db)[0]["entitled"] is True  # access runs to the end of the paid period

    clock.set(_utc(2026, 2, 28, 12))
    run_scheduler()
    drain()
    sub = _sub(db)
    assert (sub["status"], sub["cancel_reason"]) == ("canceled", "canceled_at_period_end")
    assert _charges(db) == [("subscription_charge", _utc(2026, 1, 31, 12), -10 * USD)]
    keys = {r["id"]: r["status"] for r in db("SELECT id, status FROM api_keys")}
    assert keys.pop(user_key.key_id) == "active"
    assert list(keys.values()) == ["revoked"]
    assert _entitlement(db)[0]["entitled"] is False
    # nothing is due any more
    clock.advance(40 * DAY)
    assert run_scheduler().enqueued == 0


def test_short_funds_go_past_due_then_dunning_retry_restores_active_for_the_unpaid_period(
    setup, producer, drain, db, clock, run_scheduler, services
):
    from db import money

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 15 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    sub_id = _sub(db)["id"]
    due = _utc(2026, 2, 28, 12)
    clock.set(due)
    run_scheduler()
    drain()
    sub = _sub(db)
    assert _outcome(db, f"renew:{sub_id}:2026-02-28T12:00:00Z") == "past_due"
    assert (sub["status"], sub["past_due_since"], sub["grace_ends_at"]) == ("past_due", due, due + 3 * DAY)
    assert sub["next_retry_at"] == due + DAY
    assert _entitlement(db) == [
        {"status": "past_due", "entitled": True, "current_period_end": due, "grace_ends_at": due + 3 * DAY}
    ]
    # before the first retry is due, passes enqueue nothing
    clock.set(due + timedelta(hours=23))
    assert run_scheduler().enqueued == 0
    clock.set(due + DAY)
    assert run_scheduler().retries == 1
    drain()
    assert _outcome(db, f"renew:{sub_id}:2026-02-28T12:00:00Z:retry:1") == "past_due"
    assert _sub(db)["next_retry_at"] == due + 2 * DAY
    _audit(services, clock)  # past_due is a consistent state: projection, grace and retry agree

    # the customer pays; the second retry charges the unpaid period and restores active
    _money(
        services,
        lambda c: money.credit_account(
            c, account_id="a1", amount_micros=20 * USD, idempotency_key="wire-1", now=clock.now()
        ),
    )
    clock.set(due + 2 * DAY)
    run_scheduler()
    drain()
    sub = _sub(db)
    assert _outcome(db, f"renew:{sub_id}:2026-02-28T12:00:00Z:retry:2") == "renewed"
    assert sub["status"] == "active"
    assert (sub["current_period_start"], sub["current_period_end"]) == (due, _utc(2026, 3, 31, 12))
    assert (sub["past_due_since"], sub["grace_ends_at"], sub["next_retry_at"], sub["dunning_attempts"]) == (
        None,
        None,
        None,
        0,
    )
    assert _charges(db)[-1] == ("renewal_charge", due, -10 * USD)
    assert _entitlement(db)[0]["status"] == "active" and _entitlement(db)[0]["grace_ends_at"] is None
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 15 * USD}]
    _audit(services, clock)


def test_still_unpaid_at_the_end_of_grace_cancels_and_revokes(
    setup, producer, drain, db, clock, run_scheduler, services
):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 15 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    due = _utc(2026, 2, 28, 12)
    outcomes = []
    for offset in (0, 1, 2, 3):
        clock.set(due + offset * DAY)
        run_scheduler()
        drain()
        outcomes.append(
            json.loads(
                db("SELECT result FROM idempotency_keys ORDER BY updated_at DESC LIMIT 1")[0]["result"]
            )["outcome"]
        )
    assert outcomes == ["past_due", "past_due", "past_due", "canceled_unpaid"]
    sub = _sub(db)
    assert (sub["status"], sub["cancel_reason"]) == ("canceled", "unpaid_after_grace")
    assert db("SELECT status FROM api_keys") == [{"status": "revoked"}]
    assert _entitlement(db)[0]["entitled"] is False
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 5 * USD}]  # never overdrawn
    clock.advance(10 * DAY)
    assert run_scheduler().enqueued == 0
    _audit(services, clock)


def test_reactivation_after_cancel_in_the_same_month_charges_again(
    setup, producer, drain, db, clock, run_scheduler, services
):
    """Seed 004: first activation and reactivation must not share a key."""
    from db import money

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="signup-1")
    drain()
    first = _sub(db)["id"]
    _money(
        services,
        lambda c: money.set_cancel_at_period_end(c, subscription_id=first, cancel=True, now=clock.now()),
    )
    clock.set(_utc(2026, 2, 28, 12))
    run_scheduler()
    drain()
    # same month: the old key is a duplicate (no charge), a new key reactivates and charges
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="signup-1")
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="reactivate-2026-02")
    drain()
    assert _outcome(db, "reactivate-2026-02") == "subscribed"
    subs = db("SELECT id, status FROM subscriptions ORDER BY created_at")
    assert [s["status"] for s in subs] == ["canceled", "active"]
    assert [c[0] for c in _charges(db)] == ["subscription_charge", "subscription_charge"]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 80 * USD}]
    assert db("SELECT entitled, subscription_id FROM entitlements") == [
        {"entitled": True, "subscription_id": subs[1]["id"]}
    ]


def test_after_downtime_every_missed_period_is_charged_once_in_order(
    setup, producer, drain, db, clock, run_scheduler
):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "daily", "price_micros": 1 * USD, "interval": "day"}],
    )
    producer.subscribe(account_id="a1", plan_id="daily", idempotency_key="k1")
    drain()
    start = _utc(2026, 1, 31, 12)
    # the scheduler was down for five days; one pass, run twice, catches up
    clock.set(start + 6 * DAY)
    run_scheduler()
    run_scheduler()
    drain()
    periods = [c[1] for c in _charges(db)]
    assert periods == [start + n * DAY for n in range(7)]
    assert _sub(db)["current_period_end"] == start + 7 * DAY
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 93 * USD}]


def test_two_passes_at_once_charge_each_period_once(setup, producer, drain, db, clock, services, broker):
    from db.engine import make_engine
    from workers.scheduler import Scheduler

    setup(
        accounts=[{"account_id": f"a{i}", "balance_micros": 100 * USD} for i in range(20)],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    for i in range(20):
        producer.subscribe(account_id=f"a{i}", plan_id="pro", idempotency_key=f"k{i}")
    drain()
    clock.set(_utc(2026, 2, 28, 12))

    async def passes():
        engines = [make_engine(services.database_url, pool_size=1) for _ in range(2)]
        try:
            schedulers = [Scheduler(e, broker, clock=clock, batch_size=3) for e in engines]
            return await asyncio.gather(*(s.run_pass() for s in schedulers), schedulers[0].run_pass())
        finally:
            for e in engines:
                await e.dispose()

    reports = asyncio.run(passes())
    assert sum(r.renewals for r in reports) >= 20
    drain()
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 20}]
    assert db("SELECT DISTINCT balance_micros FROM accounts") == [{"balance_micros": 80 * USD}]


def test_only_one_scheduler_scans_at_a_time(services, broker, clock):
    from db.engine import make_engine
    from db.schedule import release_scheduler_lock, try_scheduler_lock
    from workers.scheduler import Scheduler

    async def run():
        holder = make_engine(services.database_url, pool_size=1)
        engine = make_engine(services.database_url, pool_size=1)
        try:
            async with holder.connect() as conn:
                assert await try_scheduler_lock(conn)
                blocked = await Scheduler(engine, broker, clock=clock).run_pass()
                await release_scheduler_lock(conn)
                await conn.commit()
            free = await Scheduler(engine, broker, clock=clock).run_pass()
            return blocked, free
        finally:
            await holder.dispose()
            await engine.dispose()

    blocked, free = asyncio.run(run())
    assert (blocked.ran, free.ran) == (False, True)


def test_scheduler_streams_in_batches_of_the_configured_size(
    setup, producer, drain, db, clock, services, broker
):
    from db.engine import make_engine
    from workers.scheduler import Scheduler

    setup(
        accounts=[{"account_id": f"a{i}", "balance_micros": 100 * USD} for i in range(5)],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    for i in range(5):
        producer.subscribe(account_id=f"a{i}", plan_id="pro", idempotency_key=f"k{i}")
    drain()
    clock.set(_utc(2026, 2, 28, 12))
    batches, totals = [], []

    async def run():
        engine = make_engine(services.database_url, pool_size=1)
        try:
            return await Scheduler(engine, broker, clock=clock, batch_size=2).run_pass(
                on_total=totals.append, on_batch=batches.append
            )
        finally:
            await engine.dispose()

    report = asyncio.run(run())
    assert (totals, batches, report.renewals) == ([5], [2, 2, 1], 5)
    drain()
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 5}]


def test_three_plans_renewing_in_one_pass_each_see_the_real_balance(
    setup, producer, drain, db, clock, run_scheduler
):
    """Seed 004's stale snapshot: an account that can pay for two of three plans ends with exactly two renewed."""
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 50 * USD}],
        plans=[{"plan_id": p, "price_micros": 10 * USD} for p in ("p1", "p2", "p3")],
    )
    for p in ("p1", "p2", "p3"):
        producer.subscribe(account_id="a1", plan_id=p, idempotency_key=f"s-{p}")
    drain()
    clock.set(_utc(2026, 2, 28, 12))
    assert run_scheduler().renewals == 3
    drain()
    statuses = sorted(r["status"] for r in db("SELECT status FROM subscriptions"))
    assert statuses == ["active", "active", "past_due"]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 0}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 2}]


def test_entitlements_read_with_one_plain_select_in_the_same_transaction(
    setup, producer, drain, clock, services
):
    """The projection is a plain table: no view, no function; it changes with the effect's commit."""
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    from db.engine import make_engine

    async def read():
        engine = make_engine(services.database_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                kinds = (
                    await conn.execute(
                        text("SELECT relkind::text FROM pg_class WHERE relname = 'entitlements'")
                    )
                ).scalar_one()
                rows = (
                    await conn.execute(text("SELECT account_id, plan_id, entitled FROM entitlements"))
                ).all()
                # the subscription and its projection agree in every committed state
                disagree = (
                    await conn.execute(
                        text(
                            "SELECT count(*) FROM subscriptions s JOIN entitlements e ON e.subscription_id = s.id "
                            "WHERE e.status <> s.status OR e.current_period_end <> s.current_period_end"
                        )
                    )
                ).scalar_one()
                return kinds, rows, disagree
        finally:
            await engine.dispose()

    kinds, rows, disagree = asyncio.run(read())
    assert kinds == "r"  # an ordinary table
    assert [tuple(r) for r in rows] == [("a1", "pro", True)]
    assert disagree == 0


def test_a_queued_renewal_is_sent_again_only_once_it_is_gone_and_the_resend_interval_passed(
    setup, producer, drain, db, clock, services, broker
):
    """The scheduler does not copy a renewal the queue still holds (a copy at every pass floods a
    backlog faster than workers drop copies) for up to ``hold_at_most``, sends a lost one again once
    ``resend_after`` has passed, and sends the next period at once."""
    import redis

    from db.engine import make_engine
    from tasks.messages import renewal_key
    from workers.broker import make_broker
    from workers.scheduler import Scheduler
    from workers.settings import get_settings

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "daily", "price_micros": 1 * USD, "interval": "day"}],
    )
    producer.subscribe(account_id="a1", plan_id="daily", idempotency_key="k1")
    drain()
    sub = _sub(db)
    end = sub["current_period_end"]
    idle = make_broker(get_settings(), url=services.redis_db(2))  # no worker consumes it
    client = redis.Redis.from_url(services.redis_db(2))
    five, minute, second = timedelta(minutes=5), timedelta(minutes=1), timedelta(seconds=1)

    def sent(at, resend_after=five, on=idle):
        """(renewals sent, held back) by one pass at ``at``."""
        clock.set(at)

        async def run():
            engine = make_engine(services.database_url, pool_size=2)
            try:
                return await Scheduler(engine, on, clock=clock, resend_after=resend_after).run_pass()
            finally:
                await engine.dispose()

        report = asyncio.run(run())
        return report.renewals, report.held

    def queued():
        return [json.loads(m)["kwargs"]["idempotency_key"] for m in client.hvals("dramatiq:billing.msgs")]

    try:
        assert sent(end) == (1, 0)
        assert sent(end + 4 * minute) == (0, 0)  # within the resend interval: not even looked up
        assert sent(end + 4 * minute, resend_after=timedelta(0)) == (0, 1)  # the queue holds it
        assert sent(end + 5 * minute + second) == (0, 1)
        assert queued() == [renewal_key(sub["id"], end, 0)]
        # held 30 min (hold_at_most): sent again all the same, one copy
        assert sent(end + 30 * minute - second) == (0, 1)
        assert sent(end + 30 * minute + second) == (1, 0)
        assert sent(end + 36 * minute) == (0, 1)
        assert queued() == [renewal_key(sub["id"], end, 0)] * 2
        client.flushdb()  # lost (a Redis failover drops acknowledged writes)
        assert sent(end + 36 * minute) == (1, 0)
        assert queued() == [renewal_key(sub["id"], end, 0)]

        # the next period is another renewal: the record of the one before does not hold it back
        client.flushdb()
        assert sent(end + DAY - second) == (
            1,
            0,
        )  # recorded, and (below) charged through the session's worker
        assert sent(end + DAY - second, resend_after=timedelta(0), on=broker) == (1, 0)
        drain()
        assert _sub(db)["current_period_end"] == end + DAY
        assert sent(end + DAY) == (1, 0)
        assert db("SELECT period_start, retry FROM scheduled_renewals") == [
            {"period_start": end + DAY, "retry": 0}
        ]
    finally:
        client.close()
