"""``billing audit``'s deadline checks, each tested both ways: it passes on a healthy database and fails,
naming the rows, on one with that state past its deadline.  No check excuses a state because a
``failed_messages`` row exists.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

USD = 1_000_000


@pytest.fixture
def healthy(setup, producer, drain, db, clock, services, audit) -> dict[str, Any]:
    """A subscribed account (and one with auto-top-up), every queue drained, the audit clean."""
    setup(
        accounts=[
            {"account_id": "a1", "balance_micros": 50 * USD},
            {
                "account_id": "a2",
                "balance_micros": 0,
                "auto_top_up_threshold_micros": 0,
                "auto_top_up_amount_micros": 30 * USD,
                "payment_method_ref": "pm_card_visa",
            },
        ],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s1")
    producer.subscribe(account_id="a2", plan_id="pro", idempotency_key="s2")  # tops up first
    drain()
    assert audit(quiescent=True) == {}
    sub = db("SELECT id, current_period_end FROM subscriptions WHERE account_id = 'a1'")[0]
    attempt = db("SELECT id, message_idempotency_key AS key FROM top_up_attempts")[0]
    return {"sub": sub, "attempt": attempt}


def _fail(db, key: str) -> None:
    """A failed_messages row for ``key``: it must excuse nothing."""
    db(
        "INSERT INTO failed_messages (message_id, actor_name, queue_name, idempotency_key, error_type, error_message)"
        " VALUES ($1, 'auto_top_up', 'billing.payments', $2, 'provider_timeout', 'timed out')",
        f"m-{key}",
        key,
    )


def test_an_active_subscription_left_unpaid_past_its_period_end_is_flagged(
    healthy, db, clock, services, audit
):
    clock.set(healthy["sub"]["current_period_end"] + timedelta(minutes=30))
    assert "no_unpaid_entitled_period" not in audit(quiescent=False)  # the renewal's time
    clock.set(healthy["sub"]["current_period_end"] + timedelta(hours=2))  # nobody renewed it
    flagged = audit(quiescent=False)["no_unpaid_entitled_period"]
    both = db("SELECT id FROM subscriptions ORDER BY id")
    assert sorted(r["subscription_id"] for r in flagged) == [r["id"] for r in both]
    assert all(r["entitled"] is True for r in flagged)


def test_a_past_due_subscription_past_the_end_of_its_grace_is_flagged(healthy, db, clock, services, audit):
    since = healthy["sub"]["current_period_end"]
    ends = since + timedelta(days=3)
    for sql in (
        "UPDATE subscriptions SET status = 'past_due', past_due_since = $1, grace_ends_at = $2,"
        " next_retry_at = $2",
        "UPDATE entitlements SET status = 'past_due', grace_ends_at = $2 WHERE $1::timestamptz IS NOT NULL",
    ):
        db(sql, since, ends)

    def flagged() -> list[str]:
        rows = audit(quiescent=False).get("no_unpaid_entitled_period", [])
        return sorted(r["subscription_id"] for r in rows)

    clock.set(since + timedelta(days=1))
    assert flagged() == []  # within grace: entitled and unpaid is the rule
    clock.set(ends + timedelta(hours=2))  # nobody canceled them at the end of grace
    assert flagged() == sorted(r["id"] for r in db("SELECT id FROM subscriptions"))


def _attempt(db, attempt_id: str, *, created_at, reconcile_after, provider_status: str | None = None) -> str:
    """A pending top-up attempt of a2 (with its message key); returns the message key."""
    key = f"auto_top_up:a2:{attempt_id}"
    db(
        "INSERT INTO top_up_attempts (id, account_id, message_idempotency_key, provider_idempotency_key,"
        " amount_micros, currency, payment_method_ref, billing_period, status, provider_status, reconcile_after,"
        " created_at, updated_at)"
        " VALUES ($1, 'a2', $2, $3, 30000000, 'USD', 'pm_card_visa', '2026-01', 'pending', $4::text,"
        " $5::timestamptz, $6::timestamptz, $6::timestamptz)",
        attempt_id,
        key,
        f"billing-queue:top-up:{attempt_id}",
        provider_status,
        reconcile_after,
        created_at,
    )
    return key


def test_a_top_up_pending_past_its_deadline_is_flagged_whatever_failed_messages_says(
    healthy, db, clock, services, audit
):
    key = _attempt(
        db, "tua_late", created_at=clock.now(), reconcile_after=clock.now() + timedelta(minutes=10)
    )
    _fail(db, key)
    assert "top_up_within_deadline" not in audit(quiescent=False)
    clock.advance(timedelta(minutes=20))  # the reconciler never came
    assert [r["attempt_id"] for r in audit(quiescent=False)["top_up_within_deadline"]] == ["tua_late"]
    # and once the queues are drained, a pending attempt is never fine, failure row or not
    assert [r["attempt_id"] for r in audit(quiescent=True)["no_pending_top_up"]] == ["tua_late"]


def test_a_top_up_processing_past_the_processing_deadline_is_flagged(healthy, db, clock, services, audit):
    _attempt(
        db,
        "tua_debit",
        created_at=clock.now(),
        reconcile_after=clock.now() + timedelta(hours=1),
        provider_status="processing",
    )
    # processing at the provider is a state with an owner (the reconciler), within its deadline
    assert audit(quiescent=True) == {}
    clock.advance(timedelta(days=15))
    db("UPDATE top_up_attempts SET reconcile_after = $1 WHERE id = 'tua_debit'", clock.now())
    assert [r["attempt_id"] for r in audit(quiescent=False)["top_up_within_deadline"]] == ["tua_debit"]


def test_a_wait_for_funds_with_no_top_up_coming_is_flagged(healthy, db, clock, services, audit):
    db(
        "INSERT INTO idempotency_keys (key, kind, fingerprint, status, attempts, account_id)"
        " VALUES ('w1', 'subscribe', 'f', 'waiting_for_funds', 1, 'a1')"
    )
    db(
        "INSERT INTO funds_waits (idempotency_key, account_id, actor_name, queue_name, kwargs)"
        " VALUES ('w1', 'a1', 'subscribe', 'billing', '{}')"
    )
    _fail(db, "w1")
    flagged = audit(quiescent=False)["waits_have_a_live_top_up"]
    assert sorted((r["key"], r["what"]) for r in flagged) == [("w1", "funds_waits"), ("w1", "key")]
    # with a top-up still coming for the account, the same wait is fine
    db(
        "INSERT INTO idempotency_keys (key, kind, fingerprint, status, attempts, account_id, lease_expires_at)"
        " VALUES ('t9', 'auto_top_up', 'f', 'processing', 0, 'a1', $1)",
        clock.now() + timedelta(minutes=15),
    )
    assert "waits_have_a_live_top_up" not in audit(quiescent=False)


def test_a_waiting_key_without_its_wait_row_is_flagged(healthy, db, clock, services, audit):
    db(
        "INSERT INTO idempotency_keys (key, kind, fingerprint, status, attempts, account_id)"
        " VALUES ('w2', 'renew', 'f', 'waiting_for_funds', 1, 'a2')"
    )
    db(
        "INSERT INTO idempotency_keys (key, kind, fingerprint, status, attempts, account_id, lease_expires_at)"
        " VALUES ('t8', 'auto_top_up', 'f', 'processing', 0, 'a2', $1)",
        clock.now() + timedelta(minutes=15),
    )
    flagged = audit(quiescent=False)["waits_have_a_live_top_up"]
    assert [(r["key"], r["what"]) for r in flagged] == [("w2", "key")]


def test_a_key_processing_past_its_lease_is_flagged_whatever_failed_messages_says(
    healthy, db, clock, services, audit
):
    db(
        "INSERT INTO idempotency_keys (key, kind, fingerprint, status, attempts, account_id, lease_expires_at)"
        " VALUES ('p1', 'subscribe', 'f', 'processing', 1, 'a1', $1)",
        clock.now() + timedelta(minutes=15),
    )
    _fail(db, "p1")
    assert "processing_keys_within_lease" not in audit(quiescent=False)
    assert [r["key"] for r in audit(quiescent=True)["no_unfinished_keys"]] == ["p1"]
    clock.advance(timedelta(minutes=25))
    assert [r["key"] for r in audit(quiescent=False)["processing_keys_within_lease"]] == ["p1"]


def test_an_outbox_row_past_its_deadline_is_flagged(healthy, db, clock, services, monkeypatch, audit):
    from workers import actors

    async def no_sweep(**_: Any) -> int:
        return 0

    # the session worker's sweeper would relay the row: this test plays a fleet whose sweepers died
    monkeypatch.setattr(actors.get_service(), "sweep_outbox", no_sweep)
    db(
        "INSERT INTO outbox (message_id, queue_name, actor_name, kwargs, created_at)"
        " VALUES ('o1', 'billing', 'renew', '{}', now() - interval '1 minute')"
    )
    assert "outbox_within_deadline" not in audit(quiescent=False)
    db("UPDATE outbox SET created_at = now() - interval '10 minutes' WHERE message_id = 'o1'")
    assert [r["message_id"] for r in audit(quiescent=False)["outbox_within_deadline"]] == ["o1"]


def test_a_failed_key_without_its_failure_record_is_flagged(healthy, producer, drain, db, audit):
    producer.subscribe(account_id="a1", plan_id="no-such-plan", idempotency_key="doomed")
    drain()
    assert db("SELECT status FROM idempotency_keys WHERE key = 'doomed'") == [{"status": "failed"}]
    assert "failed_key_recorded" not in audit(quiescent=True)  # failed with its record
    db("DELETE FROM failed_messages WHERE idempotency_key = 'doomed'")
    flagged = audit(quiescent=False)["failed_key_recorded"]
    assert [(r["key"], r["status"]) for r in flagged] == [("doomed", "failed")]
