"""Real worker processes: death between commit and ack, and a poison message.

Workers run as ``dramatiq workers.actors`` subprocesses on their own Redis
database, with a 1 s heartbeat timeout and maintenance every 200 ms so a dead
worker's messages come back within seconds.  ``BILLING_CRASHPOINTS`` makes
the worker process exit (status 86) at the exact step, as a SIGKILL would.
"""

from __future__ import annotations

import time

import dramatiq
import redis

from workers.crash import CRASH_EXIT_STATUS

USD = 1_000_000


def _producer(services):
    from dramatiq.brokers.redis import RedisBroker

    from tasks.producer import Producer

    return Producer(broker=RedisBroker(url=services.redis_db(1)))


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_worker_dies_between_commit_and_ack_and_the_redelivery_does_not_charge_again(
    setup, services, db, spawn_worker
):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 30 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    producer = _producer(services)
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="crash-me")
    crashing = spawn_worker(BILLING_CRASHPOINTS="after_commit:crash-me")
    assert crashing.wait(timeout=60) == CRASH_EXIT_STATUS
    # committed, never acked: the message is still held by the dead worker
    assert db("SELECT status FROM idempotency_keys") == [{"status": "completed"}]
    client = redis.Redis.from_url(services.redis_db(1))
    assert client.hlen("dramatiq:billing.msgs") == 1
    spawn_worker()  # a healthy worker requeues the dead one's message and processes it
    _wait_for(lambda: client.hlen("dramatiq:billing.msgs") == 0, 60, "the redelivered message to be acked")
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'") == [{"n": 1}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 10 * USD}]
    assert db("SELECT * FROM failed_messages") == []
    client.close()


def test_a_poison_message_is_dead_lettered_after_bounded_deliveries_while_others_flow(
    setup, services, db, spawn_worker
):
    setup(
        accounts=[
            {"account_id": "a1", "balance_micros": 100 * USD},
            {"account_id": "a2", "balance_micros": 100 * USD},
        ],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    producer = _producer(services)
    poison_id = producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="poison")
    producer.subscribe(account_id="a2", plan_id="pro", idempotency_key="healthy")
    client = redis.Redis.from_url(services.redis_db(1))
    crashes = 0
    env = {"BILLING_CRASHPOINTS": "before_commit:poison", "BILLING_MAX_DELIVERIES": "3"}
    deadline = time.monotonic() + 120
    while client.hlen("dramatiq:billing.msgs") > 0:
        assert time.monotonic() < deadline, "the poison message was never dead-lettered"
        worker = spawn_worker(**env)
        try:
            status = worker.wait(timeout=20)
        except Exception:
            worker.stop()  # no crash within 20 s: the queue has drained
            continue
        assert status == CRASH_EXIT_STATUS
        crashes += 1
    # three deliveries killed the worker; the fourth was refused and dead-lettered
    assert crashes == 3
    assert db("SELECT status, attempts FROM idempotency_keys WHERE key = 'poison'") == [
        {"status": "dead", "attempts": 4}
    ]
    failure = db("SELECT message_id, error_type, status FROM failed_messages")
    assert failure == [{"message_id": poison_id, "error_type": "too_many_deliveries", "status": "dead"}]
    assert client.zcard("dramatiq:billing.XQ") == 1
    # nothing of the poison message was applied; the healthy one was
    assert db("SELECT account_id FROM ledger_entries WHERE kind = 'subscription_charge'") == [
        {"account_id": "a2"}
    ]
    client.close()


def test_malformed_raw_messages_are_rejected_with_a_reason_and_change_nothing(
    setup, services, db, broker, drain
):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    bad = {
        "float": (
            "auto_top_up",
            {"account_id": "a1", "idempotency_key": "f", "amount_micros": 1.5},
            "amount_micros",
        ),
        "negative": (
            "auto_top_up",
            {"account_id": "a1", "idempotency_key": "n", "amount_micros": -5},
            "amount_micros",
        ),
        "huge": (
            "auto_top_up",
            {"account_id": "a1", "idempotency_key": "h", "amount_micros": 10**15 + 1},
            "amount_micros",
        ),
        "wrong_type": (
            "subscribe",
            {"account_id": 42, "plan_id": "pro", "idempotency_key": "w"},
            "account_id",
        ),
        "missing_key": ("subscribe", {"account_id": "a1", "plan_id": "pro"}, "idempotency_key"),
        "extra_field": (
            "subscribe",
            {"account_id": "a1", "plan_id": "pro", "idempotency_key": "x", "coupon": "FREE"},
            "coupon",
        ),
        "bad_period": (
            "renew",
            {"subscription_id": "s", "period_start": "yesterday", "idempotency_key": "p"},
            "period_start",
        ),
        "unknown_account": (
            "subscribe",
            {"account_id": "nobody", "plan_id": "pro", "idempotency_key": "ua"},
            "unknown account",
        ),
        "unknown_plan": (
            "subscribe",
            {"account_id": "a1", "plan_id": "nothing", "idempotency_key": "up"},
            "unknown plan",
        ),
    }
    ids = {}
    for name, (actor, kwargs, _) in bad.items():
        queue = "billing.payments" if actor == "auto_top_up" else "billing"
        msg = dramatiq.Message(queue_name=queue, actor_name=actor, args=(), kwargs=kwargs, options={})
        ids[name] = broker.enqueue(msg).message_id
    positional = dramatiq.Message(
        queue_name="billing", actor_name="subscribe", args=("a1", "pro"), kwargs={}, options={}
    )
    ids["positional"] = broker.enqueue(positional).message_id
    drain()
    rows = {
        r["message_id"]: r
        for r in db("SELECT message_id, error_type, error_message, attempts FROM failed_messages")
    }
    for name, (_, _, needle) in bad.items():
        row = rows[ids[name]]
        assert needle in row["error_message"], (name, row)
        assert row["attempts"] == 1, name  # never retried
    assert "keyword arguments only" in rows[ids["positional"]]["error_message"]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind <> 'adjustment'") == [{"n": 0}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 100 * USD}]
    assert db("SELECT * FROM subscriptions") == []
    assert broker.client.zcard("dramatiq:billing.XQ") + broker.client.zcard(
        "dramatiq:billing.payments.XQ"
    ) == len(ids)
