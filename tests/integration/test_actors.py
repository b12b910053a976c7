"""Each actor's outcomes, through real Redis and a real Dramatiq worker into real PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import time

import redis

USD = 1_000_000


def _outcome(db, key):
    rows = db("SELECT status, result FROM idempotency_keys WHERE key = $1", key)
    assert rows, f"key {key!r} was never processed"
    return rows[0]["status"], json.loads(rows[0]["result"]) if rows[0]["result"] else None


def _balance(db, account_id):
    return db("SELECT balance_micros FROM accounts WHERE id = $1", account_id)[0]["balance_micros"]


def _top_up_account(balance_micros, *, threshold, amount, card):
    """Account a1 with auto-top-up configured."""
    return {
        "account_id": "a1",
        "balance_micros": balance_micros,
        "auto_top_up_threshold_micros": threshold,
        "auto_top_up_amount_micros": amount,
        "payment_method_ref": card,
    }


def _assert_ledger_matches(db):
    bad = db(
        """SELECT a.id FROM accounts a LEFT JOIN (SELECT account_id, sum(amount_micros) s FROM ledger_entries
           GROUP BY account_id) l ON l.account_id = a.id WHERE a.balance_micros <> COALESCE(l.s, 0)"""
    )
    assert bad == []


def test_subscribe_charges_first_period_and_issues_a_hashed_key(setup, producer, drain, db, services):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 30 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    listener = redis.Redis.from_url(services.redis_url).pubsub()
    listener.subscribe("billing:api-keys:issued")
    listener.get_message(timeout=1)  # the subscribe confirmation
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="signup-1")
    drain()
    status, result = _outcome(db, "signup-1")
    assert (status, result["outcome"]) == ("completed", "subscribed")
    assert _balance(db, "a1") == 10 * USD
    charges = db("SELECT amount_micros, kind, idempotency_key FROM ledger_entries WHERE kind <> 'adjustment'")
    assert charges == [
        {"amount_micros": -20 * USD, "kind": "subscription_charge", "idempotency_key": "subscribe:signup-1"}
    ]
    key = db("SELECT id, source, status, key_hash, prefix FROM api_keys")[0]
    assert (key["source"], key["status"]) == ("managed", "active")
    ent = db("SELECT entitled, status FROM entitlements WHERE account_id = 'a1' AND plan_id = 'pro'")
    assert ent == [{"entitled": True, "status": "active"}]
    # the plaintext arrives once on the channel and only its hash is stored
    deadline = time.monotonic() + 5
    delivered = None
    while delivered is None and time.monotonic() < deadline:
        msg = listener.get_message(timeout=1)
        if msg and msg["type"] == "message":
            delivered = json.loads(msg["data"])
    listener.close()
    assert delivered is not None and delivered["key_id"] == key["id"]
    assert hashlib.sha256(delivered["api_key"].encode()).hexdigest() == key["key_hash"]
    assert delivered["api_key"] not in json.dumps(db("SELECT * FROM idempotency_keys"), default=str)


def test_subscribe_when_already_active_does_not_charge(setup, producer, drain, db):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 50 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k2")
    drain()
    assert _outcome(db, "k2")[1]["outcome"] == "already_active"
    assert _balance(db, "a1") == 30 * USD
    _assert_ledger_matches(db)


def test_subscribe_with_insufficient_funds_is_an_outcome_not_an_error(setup, producer, drain, db):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 5 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    status, result = _outcome(db, "k1")
    assert (status, result["outcome"]) == ("completed", "insufficient_funds")
    assert _balance(db, "a1") == 5 * USD
    assert db("SELECT * FROM subscriptions") == []
    assert db("SELECT * FROM failed_messages") == []


def test_short_balance_tops_up_then_the_subscribe_continues_by_itself(setup, producer, drain, db):
    setup(
        accounts=[_top_up_account(5 * USD, threshold=10 * USD, amount=50 * USD, card="pm_card_visa")],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    assert _outcome(db, "k1")[1]["outcome"] == "subscribed"
    assert _balance(db, "a1") == 35 * USD
    attempts = db("SELECT status, amount_micros FROM top_up_attempts")
    assert attempts == [{"status": "succeeded", "amount_micros": 50 * USD}]
    assert db("SELECT calls, status FROM fake_provider_charges") == [{"calls": 1, "status": "succeeded"}]
    assert db("SELECT * FROM funds_waits") == []
    _assert_ledger_matches(db)


def test_declined_top_up_leaves_the_subscribe_with_insufficient_funds(setup, producer, drain, db):
    setup(
        accounts=[_top_up_account(5 * USD, threshold=10 * USD, amount=50 * USD, card="pm_decline_card")],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    assert _outcome(db, "k1")[1]["outcome"] == "insufficient_funds"
    assert db("SELECT status FROM top_up_attempts") == [{"status": "declined"}]
    assert db("SELECT auto_top_up_consecutive_declines AS n FROM accounts") == [{"n": 1}]
    assert _balance(db, "a1") == 5 * USD


def test_same_key_twice_applies_once(setup, producer, drain, db):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    for _ in range(3):
        producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="same")
    drain()
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'") == [{"n": 1}]
    assert _balance(db, "a1") == 80 * USD
    assert db("SELECT count(*) AS n FROM subscriptions") == [{"n": 1}]


def test_same_key_with_other_arguments_is_a_conflict_recorded_and_not_retried(
    setup, producer, drain, db, broker
):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}, {"plan_id": "max", "price_micros": 30 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k")
    drain()
    conflict_id = producer.subscribe(account_id="a1", plan_id="max", idempotency_key="k")
    drain()
    failures = db("SELECT message_id, error_type, attempts, status FROM failed_messages")
    assert failures == [
        {"message_id": conflict_id, "error_type": "idempotency_conflict", "attempts": 1, "status": "dead"}
    ]
    assert _balance(db, "a1") == 80 * USD
    assert db("SELECT plan_id FROM subscriptions") == [{"plan_id": "pro"}]
    # the original key's record is untouched
    assert _outcome(db, "k")[1]["outcome"] == "subscribed"
    # dead-lettered by Dramatiq, not retried
    assert broker.client.zcard("dramatiq:billing.XQ") == 1


def test_renew_charges_each_period_once_whatever_the_key(setup, producer, drain, db):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    drain()
    sub = db("SELECT id, current_period_end FROM subscriptions")[0]
    period = sub["current_period_end"]
    producer.renew(
        subscription_id=sub["id"],
        period_start=period,
        idempotency_key=f"renew:{sub['id']}:{period.isoformat()}",
    )
    producer.renew(subscription_id=sub["id"], period_start=period, idempotency_key="other-producer-1")
    producer.renew(subscription_id=sub["id"], period_start=period, idempotency_key="other-producer-2")
    drain()
    outcomes = sorted(
        json.loads(r["result"])["outcome"]
        for r in db("SELECT result FROM idempotency_keys WHERE kind = 'renew'")
    )
    assert outcomes == ["already_paid", "already_paid", "renewed"]
    # the key rows learn the account the message did not name
    assert db("SELECT DISTINCT account_id FROM idempotency_keys WHERE kind = 'renew'") == [
        {"account_id": "a1"}
    ]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 1}]
    assert _balance(db, "a1") == 60 * USD
    after = db("SELECT current_period_start, current_period_end FROM subscriptions")[0]
    assert after["current_period_start"] == period and after["current_period_end"] > period
    # a period that does not follow the paid one is not charged
    producer.renew(
        subscription_id=sub["id"],
        period_start=after["current_period_end"].replace(year=2099),
        idempotency_key="far",
    )
    drain()
    # not charged, and not decided either: the key is forgotten, so the same
    # key sent when that period is due would charge it then
    assert db("SELECT key FROM idempotency_keys WHERE key = 'far'") == []
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 1}]
    _assert_ledger_matches(db)


def test_explicit_top_up_with_provider_timeout_after_charging_credits_once(setup, producer, drain, db):
    setup(accounts=[_top_up_account(0, threshold=1 * USD, amount=10 * USD, card="pm_timeout_after_charge")])
    producer.auto_top_up(account_id="a1", idempotency_key="t1", amount_micros=7 * USD, reason="manual")
    producer.auto_top_up(account_id="a1", idempotency_key="t1", amount_micros=7 * USD, reason="manual")
    drain()
    assert _outcome(db, "t1")[1]["outcome"] == "topped_up"
    # the provider saw the same key twice (timeout, then the retry) and charged once
    assert db("SELECT calls, status, amount_micros FROM fake_provider_charges") == [
        {"calls": 2, "status": "succeeded", "amount_micros": 7 * USD}
    ]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'top_up'") == [{"n": 1}]
    assert _balance(db, "a1") == 7 * USD
    # a second top-up in the same period is refused by the per-period limit
    producer.auto_top_up(account_id="a1", idempotency_key="t2", reason="manual")
    drain()
    assert _outcome(db, "t2")[1]["outcome"] == "limit_reached"
    assert _balance(db, "a1") == 7 * USD


def test_threshold_crossing_triggers_one_top_up(setup, producer, drain, db):
    setup(
        accounts=[_top_up_account(25 * USD, threshold=10 * USD, amount=40 * USD, card="pm_card_visa")],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}, {"plan_id": "lite", "price_micros": 1 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="k1")
    producer.subscribe(account_id="a1", plan_id="lite", idempotency_key="k2")
    drain()
    assert db("SELECT count(*) AS n FROM top_up_attempts") == [{"n": 1}]
    assert _balance(db, "a1") == (25 - 20 - 1 + 40) * USD
    _assert_ledger_matches(db)
