"""Races on separate connections and crashes at exact steps of the money path.

These tests drive :class:`workers.billing.BillingService` directly: every
call below uses its own pooled PostgreSQL connection, and concurrent calls
are started together with ``asyncio.gather`` so that their transactions
really overlap.  Crashes are simulated in-process at the named step
(``SimulatedCrash`` unwinds the call like a dying process: nothing after the
step runs); the next delivery must continue from where the crash left off.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from workers.billing import BillingService, Delivery
from workers.clock import FixedClock
from workers.crash import SimulatedCrash

USD = 1_000_000


def _service(services: Any, broker: Any = None, **kw: Any) -> BillingService:
    from db.engine import make_engine
    from workers.providers import FakePaymentProvider

    engine = make_engine(services.database_url, pool_size=20)
    return BillingService(engine=engine, provider=FakePaymentProvider(engine), broker=broker, **kw)


async def _q(service: BillingService, sql: str) -> list[dict[str, Any]]:
    from sqlalchemy import text

    async with service.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(text(sql))).mappings().all()]


def _sub(account: str, plan: str, key: str) -> dict[str, str]:
    return {"account_id": account, "plan_id": plan, "idempotency_key": key}


def test_racing_subscribes_on_an_account_that_can_pay_for_one(setup, services, db):
    accounts = [f"race-{i}" for i in range(20)]
    setup(
        accounts=[{"account_id": a, "balance_micros": 25 * USD} for a in accounts],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}, {"plan_id": "team", "price_micros": 20 * USD}],
    )

    async def run() -> list[Any]:
        service = _service(services)
        try:
            calls = []
            for a in accounts:
                for plan in ("pro", "team"):
                    calls.append(
                        service.handle("subscribe", _sub(a, plan, f"{a}:{plan}"), Delivery(f"m-{a}-{plan}"))
                    )
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await service.engine.dispose()

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    outcomes = sorted(r["outcome"] for r in results)
    assert outcomes == ["insufficient_funds"] * 20 + ["subscribed"] * 20
    per_account = db(
        "SELECT account_id, count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge' GROUP BY 1 ORDER BY 1"
    )
    assert per_account == [{"account_id": a, "n": 1} for a in sorted(accounts)]
    assert db("SELECT DISTINCT balance_micros FROM accounts") == [{"balance_micros": 5 * USD}]


def test_the_same_message_in_two_workers_at_once_has_one_effect(setup, services, db):
    """Dramatiq's Redis broker can hand one message to two workers (its issue #692)."""
    setup(
        accounts=[{"account_id": f"a{i}", "balance_micros": 100 * USD} for i in range(10)],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )

    async def run() -> list[Any]:
        service = _service(services)
        try:
            calls = []
            for i in range(10):
                kwargs = _sub(f"a{i}", "pro", f"k{i}")
                calls += [service.handle("subscribe", kwargs, Delivery(f"msg-{i}")) for _ in range(3)]
            return await asyncio.gather(*calls)
        finally:
            await service.engine.dispose()

    results = asyncio.run(run())
    assert sum(1 for r in results if not r.get("duplicate")) == 10
    assert {r["outcome"] for r in results} == {"subscribed"}
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'") == [{"n": 10}]
    assert db("SELECT count(*) AS n FROM api_keys") == [{"n": 10}]


def test_two_plans_renewing_together_each_see_the_real_balance(setup, services, db):
    """Seed 004's stale-snapshot bug: an account that can pay for two of three renewals renews exactly two."""
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 50 * USD}],
        plans=[{"plan_id": p, "price_micros": 10 * USD} for p in ("p1", "p2", "p3")],
    )

    async def run() -> list[Any]:
        service = _service(services)
        try:
            for p in ("p1", "p2", "p3"):
                await service.handle("subscribe", _sub("a1", p, f"s-{p}"), Delivery(f"m-{p}"))
            subs = await _q(service, "SELECT id, current_period_end FROM subscriptions")
            # at period end (renewed early, a short balance decides nothing before it)
            service.clock = FixedClock(max(s["current_period_end"] for s in subs))
            return await asyncio.gather(
                *(
                    service.handle(
                        "renew",
                        {
                            "subscription_id": s["id"],
                            "period_start": s["current_period_end"].isoformat(),
                            "idempotency_key": f"r-{s['id']}",
                        },
                        Delivery(f"r-{s['id']}"),
                    )
                    for s in subs
                )
            )
        finally:
            await service.engine.dispose()

    # 50 - 3 x 10 = 20 left: two of three renewals fit
    results = asyncio.run(run())
    assert sorted(r["outcome"] for r in results) == ["past_due", "renewed", "renewed"]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 0}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 2}]


TOP_UP_ACCOUNT = {
    "account_id": "a1",
    "balance_micros": 0,
    "auto_top_up_threshold_micros": 1 * USD,
    "auto_top_up_amount_micros": 10 * USD,
    "payment_method_ref": "pm_card_visa",
}


@pytest.mark.parametrize(
    "step", ["after_top_up_intent", "after_provider_charge", "before_commit", "after_commit"]
)
def test_top_up_continues_from_each_phase_after_a_crash(setup, services, db, step):
    setup(accounts=[TOP_UP_ACCOUNT])
    kwargs = {"account_id": "a1", "idempotency_key": "t1", "reason": "test"}

    async def run() -> dict[str, Any]:
        crashing = _service(services, crashpoints={step: ""})
        try:
            with pytest.raises(SimulatedCrash):
                await crashing.handle("auto_top_up", kwargs, Delivery("m1"))
        finally:
            await crashing.engine.dispose()
        service = _service(services)
        try:
            return await service.handle("auto_top_up", kwargs, Delivery("m1", retries=0))
        finally:
            await service.engine.dispose()

    result = asyncio.run(run())
    assert result["outcome"] == "topped_up"
    charges = db("SELECT status, amount_micros FROM fake_provider_charges")
    assert charges == [{"status": "succeeded", "amount_micros": 10 * USD}]  # the card charged once
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'top_up'") == [{"n": 1}]  # credited once
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 10 * USD}]
    assert db("SELECT status, recovery_point FROM top_up_attempts") == [
        {"status": "succeeded", "recovery_point": "finished"}
    ]


def test_crash_before_commit_applies_nothing_and_the_redelivery_applies_once(setup, services, db):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 30 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )

    async def run() -> dict[str, Any]:
        crashing = _service(services, crashpoints={"before_commit": ""})
        try:
            with pytest.raises(SimulatedCrash):
                await crashing.handle("subscribe", _sub("a1", "pro", "k1"), Delivery("m1"))
        finally:
            await crashing.engine.dispose()
        service = _service(services)
        assert await _q(service, "SELECT count(*) AS n FROM subscriptions") == [{"n": 0}]
        try:
            return await service.handle("subscribe", _sub("a1", "pro", "k1"), Delivery("m1"))
        finally:
            await service.engine.dispose()

    assert asyncio.run(run())["outcome"] == "subscribed"
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 10 * USD}]
    assert db("SELECT attempts FROM idempotency_keys") == [{"attempts": 2}]


def test_outbox_left_by_a_crash_after_commit_is_relayed_by_the_sweeper(setup, services, db):
    """A renew that cancels (at period end) writes its revoke_key to the outbox; the worker dies before relaying it.

    The relay goes to a broker on its own Redis database: the session's in-process worker, when an
    earlier test started it, consumes the shared broker's queues and would take the message first.
    """
    from db import money
    from db.engine import transaction
    from workers.broker import make_broker
    from workers.settings import get_settings

    broker = make_broker(get_settings(), url=services.redis_db(2))

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 20 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )

    async def run() -> int:
        service = _service(services)
        try:
            await service.handle("subscribe", _sub("a1", "pro", "k1"), Delivery("m1"))
            sub = (await _q(service, "SELECT id, current_period_end FROM subscriptions"))[0]
            async with transaction(service.engine) as conn:
                await money.set_cancel_at_period_end(
                    conn, subscription_id=sub["id"], cancel=True, now=service.clock.now()
                )
        finally:
            await service.engine.dispose()
        # at period end: a cancel at period end never happens before it
        at_period_end = FixedClock(sub["current_period_end"])
        crashing = _service(services, broker=broker, crashpoints={"after_commit": ""}, clock=at_period_end)
        renew = {
            "subscription_id": sub["id"],
            "period_start": sub["current_period_end"].isoformat(),
            "idempotency_key": "r1",
        }
        try:
            with pytest.raises(SimulatedCrash):
                await crashing.handle("renew", renew, Delivery("m2"))
        finally:
            await crashing.engine.dispose()
        sweeper = _service(services, broker=broker)
        try:
            assert [r["actor_name"] for r in await _q(sweeper, "SELECT actor_name FROM outbox")] == [
                "revoke_key"
            ]
            return await sweeper.sweep_outbox(older_than_s=0)
        finally:
            await sweeper.engine.dispose()

    assert asyncio.run(run()) == 1
    assert db("SELECT * FROM outbox") == []
    queued = broker.client.hvals("dramatiq:billing.msgs")
    assert [json.loads(m)["actor_name"] for m in queued] == ["revoke_key"]


async def _process_outbox(service: BillingService) -> list[dict[str, Any]]:
    """Relay by hand: handle each outbox message (as a worker would after the relay), until none is left."""
    from sqlalchemy import text

    results = []
    for _ in range(10):
        async with service.engine.begin() as conn:
            rows = (
                (await conn.execute(text("DELETE FROM outbox RETURNING message_id, actor_name, kwargs")))
                .mappings()
                .all()
            )
        if not rows:
            return results
        for r in rows:
            results.append(await service.handle(r["actor_name"], r["kwargs"], Delivery(r["message_id"])))
    raise AssertionError("the outbox kept refilling")


@pytest.mark.parametrize(
    "step", ["after_top_up_intent", "after_provider_charge", "before_commit", "after_commit"]
)
def test_a_subscribe_waiting_for_a_top_up_continues_exactly_once_after_a_crash_at_each_phase(
    setup, services, db, step
):
    setup(
        accounts=[{**TOP_UP_ACCOUNT, "balance_micros": 5 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 8 * USD}],
    )

    async def run() -> list[dict[str, Any]]:
        service = _service(services)
        crashing = _service(services, crashpoints={step: "auto_top_up"})
        try:
            first = await service.handle("subscribe", _sub("a1", "pro", "s1"), Delivery("m1"))
            assert first["outcome"] == "awaiting_top_up"
            # the top-up's first delivery dies at the step, the outbox row already gone (relayed)
            async with service.engine.begin() as conn:
                from sqlalchemy import text

                (top_up,) = (
                    (await conn.execute(text("DELETE FROM outbox RETURNING message_id, actor_name, kwargs")))
                    .mappings()
                    .all()
                )
            with pytest.raises(SimulatedCrash):
                await crashing.handle("auto_top_up", top_up["kwargs"], Delivery(top_up["message_id"]))
            # redelivery of the same message, then whatever it sent on
            redelivered = await service.handle(
                "auto_top_up", top_up["kwargs"], Delivery(top_up["message_id"])
            )
            return [redelivered, *await _process_outbox(service)]
        finally:
            await service.engine.dispose()
            await crashing.engine.dispose()

    results = asyncio.run(run())
    assert results[0]["outcome"] == "topped_up"
    assert [r["outcome"] for r in results[1:]] == ["subscribed"]  # resumed once
    assert db("SELECT count(*) AS n FROM fake_provider_charges") == [{"n": 1}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'top_up'") == [{"n": 1}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'") == [{"n": 1}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": (5 + 10 - 8) * USD}]
    assert db("SELECT status FROM idempotency_keys WHERE key = 's1'") == [{"status": "completed"}]
    assert db("SELECT * FROM funds_waits") == []


@pytest.mark.parametrize("step", ["fast_after_claim", "fast_after_apply"])
def test_a_fast_path_renewal_crashing_between_claim_and_apply_or_after_is_applied_once_on_redelivery(
    setup, services, db, step
):
    """The fast path claims its batch's keys in one autocommit statement and applies them in another.

    A process death after the claim (committed, nothing applied) or after the
    apply (committed, no delivery told) leaves the key ``processing`` or
    ``completed``; the redelivery of the same message renews the period once.
    """
    from db.audit import run_audit
    from tasks.messages import renewal_key

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 50 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        service = _service(services)
        try:
            await service.handle("subscribe", _sub("a1", "pro", "k1"), Delivery("m1"))
            sub = (await _q(service, "SELECT id, current_period_end FROM subscriptions"))[0]
        finally:
            await service.engine.dispose()
        at_period_end = FixedClock(sub["current_period_end"])
        key = renewal_key(sub["id"], sub["current_period_end"])
        renew = {
            "subscription_id": sub["id"],
            "period_start": sub["current_period_end"].isoformat(),
            "idempotency_key": key,
        }
        crashing = _service(services, crashpoints={step: "renew:"}, clock=at_period_end)
        try:
            with pytest.raises(SimulatedCrash, match=step):
                await crashing.handle("renew", renew, Delivery("m2"))
            assert crashing.group_commits["renew"].batches == 1  # it was the fast path that died
        finally:
            await crashing.engine.dispose()
        service = _service(services, clock=at_period_end)
        left = {
            "key": (await _q(service, "SELECT status, attempts FROM idempotency_keys WHERE kind = 'renew'"))[
                0
            ],
            "charges": len(await _q(service, "SELECT 1 FROM ledger_entries WHERE kind = 'renewal_charge'")),
        }
        try:
            result = await service.handle("renew", renew, Delivery("m2", retries=0))
            assert service.group_commits["renew"].batches == 1
            report = await run_audit(service.engine, now=at_period_end.now())
            assert report.ok, {k: v for k, v in report.violations.items() if v}
            return left, result
        finally:
            await service.engine.dispose()

    left, result = asyncio.run(run())
    if step == "fast_after_claim":  # claimed and counted, not applied; the redelivery applies it
        assert left == {"key": {"status": "processing", "attempts": 1}, "charges": 0}
        assert (result["outcome"], result.get("duplicate")) == ("renewed", None)
    else:  # applied and committed; the redelivery is a duplicate
        assert left == {"key": {"status": "completed", "attempts": 1}, "charges": 1}
        assert (result["outcome"], result.get("duplicate")) == ("renewed", True)
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 1}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 10 * USD}]
    assert db("SELECT status FROM idempotency_keys WHERE kind = 'renew'") == [{"status": "completed"}]


@pytest.mark.parametrize(
    ("kwargs", "error", "key_after"),
    [
        # a permanent error: the key is ended failed with its record
        (_sub("a1", "no-such-plan", "k-doomed"), "unknown_plan", "failed"),
        # a conflict: the record alone; the key keeps its first outcome
        (_sub("a1", "other", "k-taken"), "idempotency_conflict", "completed"),
    ],
)
def test_a_permanent_failure_whose_record_loses_its_connection_is_retried_and_recorded_once(
    setup, services, db, monkeypatch, kwargs, error, key_after
):
    """The key's end and its ``failed_messages`` row commit together or not at all.

    The recording connection is terminated on the server (``pg_terminate_backend``)
    at the exact step: the delivery is then a transient error, retried, not a
    permanent one that Dramatiq would drop with the key failed and no record.
    """
    from sqlalchemy import text

    from db import money
    from tasks.errors import DatabaseUnavailable, PermanentError
    from workers import billing

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 30 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}, {"plan_id": "other", "price_micros": USD}],
    )
    real = money.record_failure
    terminated: list[int] = []

    async def terminated_once(conn: Any, **kw: Any) -> None:
        if not terminated:
            terminated.append(1)
            await conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        await real(conn, **kw)

    async def run() -> None:
        service = _service(services)
        try:
            if error == "idempotency_conflict":
                await service.handle("subscribe", _sub("a1", "pro", "k-taken"), Delivery("m0"))
            monkeypatch.setattr(billing.money, "record_failure", terminated_once)
            with pytest.raises(DatabaseUnavailable):
                await service.handle("subscribe", kwargs, Delivery("m1"))
            assert await _q(service, "SELECT count(*) AS n FROM failed_messages") == [{"n": 0}]
            if key_after == "failed":  # not failed without its record: still processing, under its lease
                assert await _q(service, "SELECT status FROM idempotency_keys WHERE key = 'k-doomed'") == [
                    {"status": "processing"}
                ]
            with pytest.raises(PermanentError):  # the retry
                await service.handle("subscribe", kwargs, Delivery("m1", retries=1))
        finally:
            await service.engine.dispose()

    asyncio.run(run())
    assert terminated == [1]
    key = kwargs["idempotency_key"]
    assert db("SELECT status FROM idempotency_keys WHERE key = $1", key) == [{"status": key_after}]
    assert db("SELECT message_id, idempotency_key, error_type, attempts FROM failed_messages") == [
        {"message_id": "m1", "idempotency_key": key, "error_type": error, "attempts": 2}
    ]
