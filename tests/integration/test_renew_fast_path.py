"""The renewal fast path (migration 0005) and its group commit, against the Python path it stands in for.

Every test drives :class:`BillingService` on a real PostgreSQL with a fixed
clock.  Twin subscriptions (same plan, same anchor, same balance) are
renewed one with the fast path and one without; every row they leave must
be the same but for their ids.  Renewals that are not plain fall back to
the Python path; renewals that arrive together are applied in one batch,
and one bad message in a batch does not sink the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from tasks.errors import UnknownSubscription
from tasks.messages import renewal_key

USD = 1_000_000
ANCHOR = datetime(2026, 1, 31, 9, 30, 15, 123456, tzinfo=UTC)  # month-end clamping, microseconds


def _run(services: Any, body: Callable[..., Awaitable[Any]], **service_args: Any) -> Any:
    """Run ``body(fast_service, slow_service, clock, sql)`` on fresh engines; returns its result."""
    from db.engine import make_engine
    from workers.billing import BillingService
    from workers.clock import FixedClock
    from workers.providers import FakePaymentProvider

    async def go() -> Any:
        engine = make_engine(services.database_url, pool_size=8)
        clock = FixedClock(ANCHOR)
        provider = FakePaymentProvider(engine)
        fast = BillingService(engine=engine, provider=provider, clock=clock, **service_args)
        slow = BillingService(engine=engine, provider=provider, clock=clock, renew_fast_path=False)

        async def sql(statement: str, **params: Any) -> list[dict[str, Any]]:
            async with engine.begin() as conn:
                return [dict(r) for r in (await conn.execute(text(statement), params)).mappings()]

        try:
            return await body(fast, slow, clock, sql)
        finally:
            await engine.dispose()

    return asyncio.run(go())


async def _open(service: Any, sql: Any, account: str, balance: int, **top_up: Any) -> str:
    """An account with ``balance`` micros subscribed to ``pro`` ($10/month) at the clock's time; returns the subscription id."""
    from db import money

    async with service.engine.begin() as conn:
        await money.create_plan(
            conn, plan_id="pro", name="Pro", price_micros=10 * USD, currency="USD", interval="month"
        )
        await money.create_account(
            conn,
            account_id=account,
            currency="USD",
            balance_micros=balance,
            now=service.clock.now(),
            **top_up,
        )
    await service.handle(
        "subscribe",
        {"account_id": account, "plan_id": "pro", "idempotency_key": f"sub:{account}"},
        _delivery(),
    )
    rows = await sql("SELECT id FROM subscriptions WHERE account_id = :a", a=account)
    return str(rows[0]["id"])


_IDS = iter(range(10**9))


def _delivery() -> Any:
    from workers.billing import Delivery

    return Delivery(message_id=f"m-{next(_IDS)}")


async def _renew(service: Any, sub_id: str, period_start: datetime, key: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = await service.handle(
        "renew",
        {
            "subscription_id": sub_id,
            "period_start": period_start.isoformat(),
            "idempotency_key": key or renewal_key(sub_id, period_start),
        },
        _delivery(),
    )
    return result


async def _state(sql: Any, sub_id: str) -> dict[str, Any]:
    """Every row a renewal touches, with this subscription's and account's ids replaced by placeholders."""
    sub = (await sql("SELECT * FROM subscriptions WHERE id = :s", s=sub_id))[0]
    account = sub["account_id"]

    def anonymize(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: anonymize(v) for k, v in value.items()}
        if isinstance(value, list):
            return [anonymize(v) for v in value]
        if isinstance(value, str):
            return value.replace(sub_id, "<sub>").replace(account, "<account>")
        return value

    ledger = await sql(
        "SELECT amount_micros, kind, period_start, idempotency_key, created_at FROM ledger_entries "
        "WHERE account_id = :a ORDER BY id",
        a=account,
    )
    keys = await sql(
        "SELECT key, kind, status, result, attempts, account_id, completed_at FROM idempotency_keys "
        "WHERE kind = 'renew' AND key LIKE '%' || :s || '%' ORDER BY key",
        s=sub_id,
    )
    balance = await sql("SELECT balance_micros, updated_at FROM accounts WHERE id = :a", a=account)
    entitlement = await sql(
        "SELECT status, entitled, current_period_end, grace_ends_at, updated_at FROM entitlements "
        "WHERE subscription_id = :s",
        s=sub_id,
    )
    sub = {k: v for k, v in sub.items() if k not in ("id", "account_id", "created_by_key", "created_at")}
    return anonymize(
        {"subscription": sub, "ledger": ledger, "keys": keys, "account": balance, "entitlement": entitlement}
    )


def test_a_fast_renewal_writes_exactly_what_the_python_path_writes(services):
    async def body(fast, slow, clock, sql):
        a = await _open(fast, sql, "twin-fast", 100 * USD)
        b = await _open(slow, sql, "twin-slow", 100 * USD)
        outcomes = []
        for _ in range(4):  # Feb 28, Mar 31, Apr 30, May 31: the month-end clamp from a Jan 31 anchor
            (end_a,) = (await sql("SELECT current_period_end FROM subscriptions WHERE id = :s", s=a))[
                0
            ].values()
            (end_b,) = (await sql("SELECT current_period_end FROM subscriptions WHERE id = :s", s=b))[
                0
            ].values()
            clock.set(end_a + timedelta(minutes=5))
            outcomes.append((await _renew(fast, a, end_a), await _renew(slow, b, end_b)))
        return outcomes, await _state(sql, a), await _state(sql, b), fast.group_commits["renew"].applied

    outcomes, state_fast, state_slow, applied = _run(services, body)
    assert applied == 4  # the fast service really took the fast path, every time
    for got_fast, got_slow in outcomes:
        assert got_fast["outcome"] == got_slow["outcome"] == "renewed"
    assert state_fast == state_slow
    ends = [e["current_period_end"] for e in [state_fast["subscription"]]]
    assert ends[0] == datetime(2026, 6, 30, 9, 30, 15, tzinfo=UTC)  # subscribe anchors on whole seconds
    assert [r["amount_micros"] for r in state_fast["ledger"]] == [100 * USD, -10 * USD] + [-10 * USD] * 4


@pytest.mark.parametrize(
    "case",
    ["short_funds", "cancel_at_period_end", "catch_up", "already_paid", "top_up_threshold", "unknown"],
)
def test_renewals_that_are_not_plain_take_the_python_path_with_the_same_outcome(services, case):
    async def body(fast, slow, clock, sql):
        from db import money

        top_up = (
            {
                "auto_top_up_threshold_micros": 95 * USD,
                "auto_top_up_amount_micros": 50 * USD,
                "payment_method_ref": "pm_ok",
            }
            if case == "top_up_threshold"
            else {}
        )
        balance = 15 * USD if case == "short_funds" else 100 * USD
        subs = {}
        for svc, name in ((fast, "f"), (slow, "s")):
            sub = await _open(svc, sql, f"{case}-{name}", balance, **top_up)
            if case == "cancel_at_period_end":
                async with svc.engine.begin() as conn:
                    await money.set_cancel_at_period_end(
                        conn, subscription_id=sub, cancel=True, now=clock.now()
                    )
            subs[name] = sub
        end = (await sql("SELECT current_period_end FROM subscriptions WHERE id = :s", s=subs["f"]))[0][
            "current_period_end"
        ]
        clock.set(end + (timedelta(days=70) if case == "catch_up" else timedelta(minutes=1)))
        results = {}
        for svc, name in ((fast, "f"), (slow, "s")):
            sub = subs[name] if case != "unknown" else f"nope-{name}"
            if case == "already_paid":
                await _renew(svc, sub, end, key=f"first:{name}")
            try:
                results[name] = (await _renew(svc, sub, end, key=f"k:{name}"))["outcome"]
            except UnknownSubscription as exc:
                results[name] = exc.code
        return results, fast.group_commits["renew"].applied, fast.group_commits["renew"].fallbacks

    results, applied, fallbacks = _run(services, body)
    assert results["f"] == results["s"], results
    expected = {
        "short_funds": "past_due",
        "cancel_at_period_end": "canceled",
        "catch_up": "renewed",
        "already_paid": "already_paid",
        "top_up_threshold": "renewed",
        "unknown": "unknown_subscription",
    }[case]
    assert results["f"] == expected
    # none of them was applied by the fast path (already_paid's first renewal was)
    assert applied == (1 if case == "already_paid" else 0)
    why = {"catch_up": "catch_up", "unknown": "unknown_subscription"}.get(case, "not_plain")
    assert fallbacks == {why: 1}


def test_renewals_that_arrive_together_commit_together_and_a_bad_one_sinks_nothing(services):
    async def body(fast, slow, clock, sql):
        subs = [await _open(fast, sql, f"group-{i}", 100 * USD) for i in range(40)]
        end = (await sql("SELECT min(current_period_end) AS e FROM subscriptions"))[0]["e"]
        clock.set(end + timedelta(minutes=1))
        jobs = [_renew(fast, s, end) for s in subs]
        jobs.append(_renew(fast, "no-such-subscription", end))  # fails alone
        jobs.append(_renew(fast, subs[0], end))  # the same key twice at once: applied once
        results = await asyncio.gather(*jobs, return_exceptions=True)
        return (
            results,
            fast.group_commits["renew"],
            await sql("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'"),
        )

    results, batcher, charged = _run(services, body)
    renewed = [r for r in results[:40]]
    assert all(isinstance(r, dict) and r["outcome"] == "renewed" for r in renewed), renewed
    assert isinstance(results[40], UnknownSubscription)
    assert results[41]["outcome"] == "renewed" and results[41].get("duplicate") is True
    assert charged[0]["n"] == 40
    assert batcher.batches < 42 and batcher.largest_batch > 1  # they were grouped


@settings(max_examples=200, deadline=None)
@given(
    anchor=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    unit=st.sampled_from(["month", "day"]),
    count=st.integers(1, 12),
    index=st.integers(0, 200),
)
def test_the_sql_period_arithmetic_matches_db_periods(services, anchor, unit, count, index):
    import asyncpg

    from db.config import plain_url
    from db.periods import period_bounds

    async def go() -> tuple[datetime, str]:
        conn = await asyncpg.connect(plain_url(services.database_url))
        try:
            await conn.execute("SET timezone = 'America/New_York'")  # must not matter
            row = await conn.fetchrow(
                "SELECT billing_period_boundary($1, $2, $3) AS b, billing_iso(billing_period_boundary($1, $2, $3)) AS iso",
                anchor,
                unit,
                count * index,
            )
            return row["b"], row["iso"]
        finally:
            await conn.close()

    boundary, iso = asyncio.run(go())
    start, _ = period_bounds(anchor, unit, count, index)
    assert boundary == start
    assert iso == start.isoformat()
