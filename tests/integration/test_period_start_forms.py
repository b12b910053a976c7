"""A period is charged once whatever form its ``period_start`` and its key take (docs/contract.md).

JavaScript's ``Date.prototype.toISOString()`` writes ``2026-02-28T12:00:00.000Z``;
the scheduler writes ``2026-02-28T12:00:00Z`` and keys the renewal
``renew:{subscription_id}:2026-02-28T12:00:00Z``.  The messages are written
as a producer in another language writes them (the kwargs as sent, not
re-serialised by our producer), through the real worker.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import dramatiq
import pytest

USD = 1_000_000
MS_FORM = "2026-02-28T12:00:00.000Z"
Z_FORM = "2026-02-28T12:00:00Z"


def _send_renew(broker, subscription_id: str, period_start: str, key: str) -> None:
    broker.enqueue(
        dramatiq.Message(
            queue_name="billing",
            actor_name="renew",
            args=(),
            kwargs={"subscription_id": subscription_id, "period_start": period_start, "idempotency_key": key},
            options={},
        )
    )


def _subscribed(setup, producer, drain, db) -> str:
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s1")
    drain()
    [sub] = db("SELECT id, current_period_end FROM subscriptions")
    assert sub["current_period_end"] == datetime(2026, 2, 28, 12, tzinfo=UTC)
    return sub["id"]


def _outcome(db, key: str) -> str:
    [row] = db("SELECT result FROM idempotency_keys WHERE key = $1", key)
    return json.loads(row["result"])["outcome"]


@pytest.mark.parametrize("ms_first", [True, False], ids=["millisecond-key-first", "scheduler-key-first"])
def test_a_period_is_charged_once_under_the_schedulers_key_and_a_millisecond_form_key(
    setup, producer, drain, db, clock, broker, ms_first
):
    sub_id = _subscribed(setup, producer, drain, db)
    clock.set(datetime(2026, 2, 28, 12, tzinfo=UTC))
    scheduler_key, ms_key = f"renew:{sub_id}:{Z_FORM}", f"renew:{sub_id}:{MS_FORM}"
    sends = [(MS_FORM, ms_key), (Z_FORM, scheduler_key)]
    for period_start, key in sends if ms_first else sends[::-1]:
        _send_renew(broker, sub_id, period_start, key)
        drain()

    charges = db("SELECT period_start FROM ledger_entries WHERE kind = 'renewal_charge'")
    assert charges == [{"period_start": datetime(2026, 2, 28, 12, tzinfo=UTC)}]
    first, second = (ms_key, scheduler_key) if ms_first else (scheduler_key, ms_key)
    assert (_outcome(db, first), _outcome(db, second)) == ("renewed", "already_paid")
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 80 * USD}]
    assert db("SELECT count(*) AS n FROM failed_messages") == [{"n": 0}]


def test_both_forms_under_the_schedulers_key_are_one_request_not_a_conflict(
    setup, producer, drain, db, clock, broker
):
    sub_id = _subscribed(setup, producer, drain, db)
    clock.set(datetime(2026, 2, 28, 12, tzinfo=UTC))
    scheduler_key = f"renew:{sub_id}:{Z_FORM}"
    _send_renew(broker, sub_id, MS_FORM, scheduler_key)
    drain()
    _send_renew(broker, sub_id, Z_FORM, scheduler_key)
    drain()

    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'renewal_charge'") == [{"n": 1}]
    assert _outcome(db, scheduler_key) == "renewed"
    # the same instant is the same fingerprint: a duplicate, never an idempotency conflict
    assert db("SELECT count(*) AS n FROM failed_messages") == [{"n": 0}]
