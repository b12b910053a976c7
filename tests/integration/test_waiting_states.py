"""Every state that waits has an owner that moves it forward and a deadline (docs/lifecycle.md "States that wait").

Regression tests of the waits that used to last forever: a renewal waiting
on a slow top-up, a top-up with no final answer, a cancel at period end
taken early, and a key left ``processing`` when its message is gone.  Real
PostgreSQL and Redis, the session's in-process worker, the injected clock.
"""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import timedelta
from typing import Any

from db.money import BillingPolicy
from workers.billing import BillingService, Delivery
from workers.providers.base import ChargeLookup, ChargeResult, PaymentProvider

USD = 1_000_000
PERIOD_END = "2026-02-28T12:00:00+00:00"  # the first period of a subscription made at CLOCK_START


def _account(card: str, *, balance: int = 10 * USD) -> dict[str, Any]:
    return {
        "account_id": "a1",
        "balance_micros": balance,
        "auto_top_up_threshold_micros": 0,
        "auto_top_up_amount_micros": 30 * USD,
        "payment_method_ref": card,
    }


def _subscribed(setup, producer, drain, db, card: str) -> dict[str, Any]:
    """a1 subscribed to a 10 USD plan with exactly 10 USD: its first renewal finds the balance short."""
    setup(accounts=[_account(card)], plans=[{"plan_id": "pro", "price_micros": 10 * USD}])
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s1")
    drain()
    sub = db("SELECT id, current_period_end FROM subscriptions")[0]
    assert sub["current_period_end"].isoformat() == PERIOD_END
    return sub


def _renewal_key(sub: dict[str, Any]) -> str:
    return f"renew:{sub['id']}:2026-02-28T12:00:00Z"


def _key(db, key: str) -> dict[str, Any]:
    (row,) = db("SELECT status, attempts, result, redrives FROM idempotency_keys WHERE key = $1", key)
    return {**row, "result": json.loads(row["result"]) if row["result"] else None}


class _GatedProvider(PaymentProvider):
    """The worker's provider, holding every charge until the test opens the gate (a slow payments queue)."""

    def __init__(self, inner: PaymentProvider) -> None:
        self.inner = inner
        self.name = inner.name
        self.key_window = inner.key_window
        self.gate = threading.Event()
        self.entered = threading.Event()

    async def charge(self, **kwargs: Any) -> ChargeResult:
        self.entered.set()
        await asyncio.to_thread(self.gate.wait, 60)
        return await self.inner.charge(**kwargs)

    async def lookup(self, **kwargs: Any) -> ChargeLookup:
        return await self.inner.lookup(**kwargs)


def _deliver(
    services, clock, renew: dict[str, str], n: int = 1, *, broker: Any = None
) -> list[dict[str, Any]]:
    """``n`` deliveries of one renewal, each a new message id (as the scheduler's passes send it), on a
    worker of the test's own (its own engine and loop, the test's clock, follow-ups relayed to ``broker``)."""
    from db.engine import make_engine
    from workers.providers import FakePaymentProvider

    async def run() -> list[dict[str, Any]]:
        engine = make_engine(services.database_url, pool_size=2)
        service = BillingService(
            engine=engine, provider=FakePaymentProvider(engine), broker=broker, clock=clock
        )
        try:
            return [await service.handle("renew", renew, Delivery(f"delivery-{i}")) for i in range(n)]
        finally:
            await engine.dispose()

    return asyncio.run(run())


# --------------------------------------------------------------------------- defect 1


def test_a_renewal_waiting_for_a_slow_top_up_outlives_the_schedulers_resends_and_resumes_once(
    setup, producer, drain, db, clock, run_scheduler, services, audit
):
    from workers import actors

    sub = _subscribed(setup, producer, drain, db, "pm_card_visa")
    service = actors.get_service()
    gated = _GatedProvider(service.provider)
    service.provider = gated
    try:
        clock.set(sub["current_period_end"])
        run_scheduler()
        assert gated.entered.wait(30), "the top-up never reached the provider"
        key = _renewal_key(sub)
        assert _key(db, key)["status"] == "waiting_for_funds"
        renew = {
            "subscription_id": sub["id"],
            "period_start": "2026-02-28T12:00:00Z",
            "idempotency_key": key,
        }
        # more re-sends than BILLING_MAX_DELIVERIES (10) while the top-up is slow: none counts
        outcomes = _deliver(services, clock, renew, 15)
        assert {o["outcome"] for o in outcomes} == {"awaiting_top_up"}
        assert all(o.get("waiting") for o in outcomes)
        assert _key(db, key)["attempts"] == 1
        gated.gate.set()
        drain()
    finally:
        gated.gate.set()
        service.provider = gated.inner
    # the top-up settled and the renewal resumed exactly once
    row = _key(db, key)
    assert (row["status"], row["result"]["outcome"]) == ("completed", "renewed")
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 1}]
    assert db("SELECT status, current_period_end FROM subscriptions")[0]["status"] == "active"
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 20 * USD}]  # 0 + 30 - 10
    assert audit() == {}


# --------------------------------------------------------------------------- defect 2


def test_a_top_up_the_provider_never_answers_is_reconciled_as_failed_and_the_renewal_goes_past_due(
    setup, producer, drain, db, clock, run_scheduler, services, audit
):
    sub = _subscribed(setup, producer, drain, db, "pm_never_answers")
    clock.set(sub["current_period_end"])
    run_scheduler()
    drain()  # the top-up's retries run out: every call timed out
    assert db("SELECT status FROM top_up_attempts") == [{"status": "pending"}]
    assert _key(db, _renewal_key(sub))["status"] == "waiting_for_funds"
    # before its deadline that is a state with an owner; past it, the audit says so
    assert "top_up_within_deadline" not in audit(quiescent=False)
    clock.advance(timedelta(minutes=16))
    assert "top_up_within_deadline" in audit(quiescent=False)
    run_scheduler()  # the reconciler: the provider has no charge under our key
    drain()
    attempt = db("SELECT status, last_error FROM top_up_attempts")[0]
    assert attempt["status"] == "failed" and "no charge under our key" in attempt["last_error"]
    assert db("SELECT * FROM fake_provider_charges") == []
    # the wait was released: the renewal re-ran, found no top-up left for the month, went past_due
    row = _key(db, _renewal_key(sub))
    assert (row["status"], row["result"]["outcome"]) == ("completed", "past_due")
    assert db("SELECT status FROM subscriptions") == [{"status": "past_due"}]
    assert db("SELECT entitled FROM entitlements") == [{"entitled": True}]
    assert audit() == {}


def test_a_charge_whose_answer_was_lost_is_found_by_the_reconciler_and_credited_once(
    setup, producer, drain, db, clock, run_scheduler, services, audit
):
    sub = _subscribed(setup, producer, drain, db, "pm_silent_charge")
    clock.set(sub["current_period_end"])
    run_scheduler()
    drain()
    # the provider took the money on the first call and answered none of the retries
    assert db("SELECT status, calls FROM fake_provider_charges") == [{"status": "succeeded", "calls": 4}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'top_up'") == [{"n": 0}]
    clock.advance(timedelta(minutes=11))
    run_scheduler()
    drain()
    assert db("SELECT status FROM top_up_attempts") == [{"status": "succeeded"}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'top_up'") == [{"n": 1}]
    assert db("SELECT calls FROM fake_provider_charges") == [{"calls": 4}]  # looked up, never charged again
    assert _key(db, _renewal_key(sub))["result"]["outcome"] == "renewed"
    top_up_key = db("SELECT message_idempotency_key AS k FROM top_up_attempts")[0]["k"]
    top_up = _key(db, top_up_key)
    assert (top_up["status"], top_up["result"]["outcome"], top_up["result"]["reconciled"]) == (
        "completed",
        "topped_up",
        True,
    )
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 20 * USD}]
    assert audit() == {}


def test_no_charge_goes_out_under_a_provider_key_older_than_its_window(
    setup, producer, drain, db, clock, run_scheduler, services, audit
):
    sub = _subscribed(setup, producer, drain, db, "pm_silent_charge")
    clock.set(sub["current_period_end"])
    run_scheduler()
    drain()
    top_up_key = db("SELECT message_idempotency_key AS k FROM top_up_attempts")[0]["k"]
    assert _key(db, top_up_key)["status"] == "failed"  # retries exhausted
    # an operator retries the top-up the next day: Stripe has forgotten the key by
    # then, so sending the charge again would charge the card a second time
    clock.advance(timedelta(hours=25))
    producer.auto_top_up(account_id="a1", idempotency_key=top_up_key, reason="low_balance")
    drain()
    assert db("SELECT calls FROM fake_provider_charges") == [{"calls": 4}]
    assert _key(db, top_up_key)["result"]["outcome"] == "top_up_reconciling"
    run_scheduler()  # reconciled instead: the charge is found and credited once
    drain()
    assert db("SELECT status FROM top_up_attempts") == [{"status": "succeeded"}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'top_up'") == [{"n": 1}]
    assert _key(db, top_up_key)["result"]["outcome"] == "topped_up"
    assert _key(db, _renewal_key(sub))["result"]["outcome"] == "renewed"
    assert audit() == {}


def test_a_top_up_processing_for_days_keeps_the_account_in_grace_until_it_settles(
    setup, producer, drain, db, clock, run_scheduler, services, audit
):
    from workers import actors

    provider = actors.get_service().provider
    previous = provider.processing  # type: ignore[attr-defined]
    # longer than the 3-day grace period
    provider.processing = timedelta(days=3, hours=5)  # type: ignore[attr-defined]
    try:
        sub = _subscribed(setup, producer, drain, db, "pm_processing")
        clock.set(sub["current_period_end"])
        run_scheduler()
        drain()
        attempt = db("SELECT status, provider_status FROM top_up_attempts")[0]
        assert (attempt["status"], attempt["provider_status"]) == ("pending", "processing")
        # nothing waits on a bank debit: the renewal went past_due, entitled within grace
        assert _key(db, _renewal_key(sub))["result"]["outcome"] == "past_due"
        assert db("SELECT status FROM subscriptions") == [{"status": "past_due"}]
        for _ in range(40):
            # the scheduler's passes: every 6 hours through the grace period (the
            # dunning retries are at +1, +2, +3 days), then hourly while grace is held open
            held = clock.now() >= sub["current_period_end"] + timedelta(days=3)
            clock.advance(timedelta(hours=1 if held else 6))
            run_scheduler()
            drain()
            state = db("SELECT status FROM subscriptions")[0]["status"]
            assert state != "canceled", f"canceled at {clock.now()} while the top-up was processing"
            assert db("SELECT entitled FROM entitlements") == [{"entitled": True}]
            assert audit(quiescent=False) == {}
            if state == "active":
                break
    finally:
        provider.processing = previous  # type: ignore[attr-defined]
    assert db("SELECT status FROM top_up_attempts") == [{"status": "succeeded"}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'top_up'") == [{"n": 1}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 1}]
    assert db("SELECT status FROM subscriptions") == [{"status": "active"}]
    assert clock.now() - sub["current_period_end"] <= timedelta(days=3, hours=7)
    assert audit() == {}


# --------------------------------------------------------------------------- defect 3


def test_a_cancel_at_period_end_happens_at_period_end_never_before(
    setup, producer, drain, db, clock, run_scheduler, services, audit
):
    from db import money
    from db.engine import make_engine, transaction

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 50 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s1")
    drain()
    sub = db("SELECT id, current_period_end FROM subscriptions")[0]

    async def cancel() -> None:
        engine = make_engine(services.database_url, pool_size=1)
        try:
            async with transaction(engine) as conn:
                await money.set_cancel_at_period_end(
                    conn, subscription_id=sub["id"], cancel=True, now=clock.now()
                )
        finally:
            await engine.dispose()

    asyncio.run(cancel())
    lead = timedelta(days=1)
    clock.set(sub["current_period_end"] - timedelta(hours=12))
    assert run_scheduler(lead_time=lead).renewals == 0  # the lead time does not apply to a cancel
    # a producer's renewal ahead of time decides nothing either, and leaves its key free
    producer.renew(
        subscription_id=sub["id"], period_start=sub["current_period_end"], idempotency_key=_renewal_key(sub)
    )
    drain()
    assert db("SELECT status FROM subscriptions") == [{"status": "active"}]
    assert db("SELECT entitled FROM entitlements") == [{"entitled": True}]
    assert db("SELECT status FROM api_keys") == [{"status": "active"}]
    assert db("SELECT key FROM idempotency_keys WHERE key = $1", _renewal_key(sub)) == []
    # at period end the scheduler's due scan drives it, under the same key
    clock.set(sub["current_period_end"])
    assert run_scheduler(lead_time=lead).renewals == 1
    drain()
    assert db("SELECT status, cancel_reason FROM subscriptions") == [
        {"status": "canceled", "cancel_reason": "canceled_at_period_end"}
    ]
    assert db("SELECT status FROM api_keys") == [{"status": "revoked"}]
    assert _key(db, _renewal_key(sub))["result"]["outcome"] == "canceled"
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 0}]
    assert audit() == {}


# --------------------------------------------------------------------------- defect 11


def _renew_with_a_lost_broker(services, clock, sub: dict[str, Any]) -> dict[str, Any]:
    """The period's renewal, on a worker whose follow-up messages (the top-up) the broker loses."""
    from dramatiq.brokers.stub import StubBroker

    lost = StubBroker()  # what is relayed here is never consumed: the message is lost
    for queue in ("billing", "billing.payments"):
        lost.declare_queue(queue)
    renew = {"subscription_id": sub["id"], "period_start": PERIOD_END, "idempotency_key": _renewal_key(sub)}
    return _deliver(services, clock, renew, broker=lost)[0]


def test_a_reserved_top_up_slot_whose_message_was_lost_is_re_sent_by_the_completer(
    setup, producer, drain, db, clock, run_scheduler, services, audit
):
    """The trigger reserved the month's top-up slot and its message vanished from the broker."""
    sub = _subscribed(setup, producer, drain, db, "pm_card_visa")
    clock.set(sub["current_period_end"])
    assert _renew_with_a_lost_broker(services, clock, sub)["outcome"] == "awaiting_top_up"
    assert db("SELECT * FROM outbox") == []  # relayed (to nowhere)
    (slot,) = db("SELECT key, status, attempts FROM idempotency_keys WHERE kind = 'auto_top_up'")
    assert (slot["status"], slot["attempts"]) == ("processing", 0)
    # within its lease it is in flight; past it the audit flags it
    assert "processing_keys_within_lease" not in audit(quiescent=False)
    clock.advance(BillingPolicy().key_lease + timedelta(minutes=6))
    assert "processing_keys_within_lease" in audit(quiescent=False)
    run_scheduler()  # the completer re-sends the slot's message from its stored request
    drain()
    assert _key(db, slot["key"])["redrives"] == 1
    assert _key(db, slot["key"])["result"]["outcome"] == "topped_up"
    assert _key(db, _renewal_key(sub))["result"]["outcome"] == "renewed"
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 1}]
    assert audit() == {}


def test_a_stale_key_the_database_cannot_re_send_is_ended_and_its_waits_released(
    setup, producer, drain, db, clock, run_scheduler, services, audit
):
    """A top-up slot re-sent max_redrives times without finishing ends as failed; its waits then go on."""
    sub = _subscribed(setup, producer, drain, db, "pm_card_visa")
    clock.set(sub["current_period_end"])
    _renew_with_a_lost_broker(services, clock, sub)
    slot = db("SELECT key FROM idempotency_keys WHERE kind = 'auto_top_up'")[0]["key"]
    # every re-send is lost too: the re-sends so far used up, as the completer counts them
    db("UPDATE idempotency_keys SET redrives = $2 WHERE key = $1", slot, BillingPolicy().max_redrives)
    clock.advance(BillingPolicy().key_lease + timedelta(minutes=1))
    run_scheduler()
    drain()
    row = _key(db, slot)
    assert row["status"] == "failed"
    (failure,) = db("SELECT error_type, kwargs, status FROM failed_messages WHERE idempotency_key = $1", slot)
    assert failure["error_type"] == "lease_expired" and failure["status"] == "dead"
    assert json.loads(failure["kwargs"])["idempotency_key"] == slot  # an operator can retry it
    # the renewal's wait had nothing left to wait on: resumed, it found the slot
    # finished and went past_due (entitled within grace), not waiting forever
    # (the clock has not moved: re-sent at once, not after BILLING_SCHEDULER_RESEND_AFTER_MS)
    run_scheduler(resend_after=timedelta(0))
    drain()
    assert _key(db, _renewal_key(sub))["result"]["outcome"] == "past_due"
    assert db("SELECT * FROM funds_waits") == []
    assert audit() == {}


def test_a_message_resumed_after_each_of_many_declined_top_ups_is_not_killed_by_its_resumes(
    setup, producer, drain, db, clock, run_scheduler, services, audit
):
    """Found by make chaos: with several top-ups allowed a month, every declined one resumed the renewal,
    each resume counted as a delivery, and after BILLING_MAX_DELIVERIES the key was dead for good."""
    from workers import actors

    service = actors.get_service()
    previous = service.policy
    service.policy = BillingPolicy(top_ups_per_period=15, disable_after_declines=0)
    try:
        sub = _subscribed(setup, producer, drain, db, "pm_decline_card")
        clock.set(sub["current_period_end"])
        run_scheduler()
        drain()
    finally:
        service.policy = previous
    # fifteen declined top-ups, the renewal resumed after each, then past_due once none is left
    assert db("SELECT count(*) AS n FROM top_up_attempts WHERE status = 'declined'") == [{"n": 15}]
    row = _key(db, _renewal_key(sub))
    assert (row["status"], row["result"]["outcome"]) == ("completed", "past_due")
    assert db("SELECT status FROM subscriptions") == [{"status": "past_due"}]
    assert audit() == {}


def test_a_card_that_never_answers_switches_auto_top_up_off_and_the_renewal_goes_past_due_in_time(
    setup, producer, drain, db, clock, run_scheduler, services, audit
):
    """Found by make chaos: with many top-ups a month allowed, failed top-ups did not count towards
    switching auto-top-up off, so a renewal waited top-up after top-up, entitled and unpaid."""
    from workers import actors

    service = actors.get_service()
    previous = service.policy
    service.policy = BillingPolicy(top_ups_per_period=1000, disable_after_declines=3)
    try:
        sub = _subscribed(setup, producer, drain, db, "pm_never_answers")
        clock.set(sub["current_period_end"])
        run_scheduler()
        drain()
        for _ in range(6):  # a scheduler pass every 11 minutes of injected time
            if db("SELECT status FROM subscriptions")[0]["status"] == "past_due":
                break
            clock.advance(timedelta(minutes=11))
            run_scheduler()
            drain()
            assert audit(quiescent=False) == {}  # never entitled unpaid past the renewal deadline
    finally:
        service.policy = previous
    assert db("SELECT status FROM subscriptions") == [{"status": "past_due"}]
    assert db("SELECT count(*) AS n FROM top_up_attempts WHERE status = 'failed'") == [{"n": 3}]
    account = db("SELECT auto_top_up_enabled, auto_top_up_disabled_reason FROM accounts")[0]
    assert account["auto_top_up_enabled"] is False
    assert clock.now() - sub["current_period_end"] < timedelta(hours=1)
    assert audit() == {}


def test_owed_usage_whose_top_up_was_declined_gets_the_next_one_from_the_completer(
    setup, producer, drain, db, clock, run_scheduler, audit
):
    """Owed usage waits for a credit; with auto-top-up on, the completer asks for the next top-up.

    The debit that left usage owed asked for a top-up, which was declined;
    the gateway now sees ``has_credits`` false, so no debit comes to ask
    again.  a1 allows three top-ups a month: after one pass past the
    deadline the audit flags it, the scheduler's pass asks for the next
    top-up (the customer fixed the card meanwhile), and it collects what is
    owed.  a2 allows one a month, used up by the decline: it waits for next
    month or a credit, and is not flagged.
    """
    owing = {
        "balance_micros": 1 * USD,
        "auto_top_up_threshold_micros": 1 * USD,
        "auto_top_up_amount_micros": 30 * USD,
        "payment_method_ref": "pm_decline",
    }
    setup(
        accounts=[
            {"account_id": "a1", **owing},
            {"account_id": "a2", **owing},
        ]
    )
    db("UPDATE accounts SET auto_top_up_max_per_period = CASE id WHEN 'a1' THEN 3 ELSE 1 END")
    for account in ("a1", "a2"):
        producer.record_usage(account_id=account, amount_micros=5 * USD, idempotency_key=f"ev-{account}")
    drain()
    state = "SELECT id, balance_micros, owed_micros FROM accounts ORDER BY id"
    assert db(state) == [
        {"id": "a1", "balance_micros": 0, "owed_micros": 4 * USD},
        {"id": "a2", "balance_micros": 0, "owed_micros": 4 * USD},
    ]
    attempts = "SELECT account_id, status FROM top_up_attempts ORDER BY account_id, created_at"
    assert db(attempts) == [
        {"account_id": "a1", "status": "declined"},
        {"account_id": "a2", "status": "declined"},
    ]
    assert audit(quiescent=True) == {}  # within the deadline

    clock.advance(timedelta(minutes=10))
    flagged = audit(quiescent=True)
    assert [r["account_id"] for r in flagged.pop("owed_usage_has_a_top_up_coming")] == ["a1"]
    assert flagged == {}

    db("UPDATE accounts SET payment_method_ref = 'pm_card_visa' WHERE id IN ('a1', 'a2')")
    report = run_scheduler()
    assert report.completer.owed_top_ups == 1
    drain()
    assert db(state) == [
        {"id": "a1", "balance_micros": 26 * USD, "owed_micros": 0},
        {"id": "a2", "balance_micros": 0, "owed_micros": 4 * USD},
    ]
    assert run_scheduler().completer.owed_top_ups == 0  # a2: the month's one top-up is used
    clock.advance(timedelta(minutes=10))
    assert audit(quiescent=True) == {}
