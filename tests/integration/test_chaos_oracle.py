"""The chaos run's three numbers (``harness.chaos.count_promise``), tested both ways.

A small healthy database (a subscription paid from the balance, one paid
after an auto-top-up) counts 0 double charges, 0 lost effects and 0 unpaid
entitled periods; then each check, on its own, is shown to count the
corruption it is there for.  Every corruption runs in a transaction that is
rolled back (some drop the constraint that makes the state impossible
today, to show the check would still see it), and a ``failed_messages``
row never excuses a state.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from harness.chaos import (
    DOUBLE_CHARGE_CHECKS,
    LOST_EFFECT_CHECKS,
    UNPAID_ENTITLED_CHECKS,
    PromiseReport,
    count_promise,
)

USD = 1_000_000
PUBLISHED = {"s1", "s2", "u1"}

_COPY_ATTEMPT = """
    INSERT INTO top_up_attempts (id, account_id, message_idempotency_key, provider_idempotency_key,
        amount_micros, currency, payment_method_ref, billing_period, status)
    SELECT id || ':copy', account_id, {message}, {provider}, amount_micros, currency, payment_method_ref,
        billing_period, status FROM top_up_attempts LIMIT 1
"""

#: check name -> (SQL statements that corrupt the healthy state, count_promise overrides)
CORRUPTIONS: dict[str, tuple[list[str], dict[str, Any]]] = {
    # -- double charges (the first three need a constraint dropped: impossible today, still watched)
    "period charged twice": (
        [
            "DROP INDEX ledger_one_charge_per_period",
            "INSERT INTO ledger_entries (account_id, amount_micros, kind, subscription_id, period_start, "
            "idempotency_key) SELECT account_id, amount_micros, kind, subscription_id, period_start, "
            "idempotency_key || ':again' FROM ledger_entries WHERE kind = 'subscription_charge' LIMIT 1",
        ],
        {},
    ),
    "provider charge credited twice": (
        [
            "ALTER TABLE top_up_attempts DROP CONSTRAINT top_up_attempts_provider_idempotency_key_key",
            _COPY_ATTEMPT.format(
                message="message_idempotency_key || ':copy'", provider="provider_idempotency_key"
            ),
            "INSERT INTO ledger_entries (account_id, amount_micros, kind, top_up_attempt_id, idempotency_key) "
            "SELECT account_id, amount_micros, 'top_up', id, 'credit-again' FROM top_up_attempts "
            "WHERE id LIKE '%:copy'",
        ],
        {},
    ),
    "top-up request charged twice at the provider": (
        [
            "ALTER TABLE top_up_attempts DROP CONSTRAINT top_up_attempts_message_idempotency_key_key",
            _COPY_ATTEMPT.format(
                message="message_idempotency_key", provider="provider_idempotency_key || ':2'"
            ),
            "INSERT INTO fake_provider_charges (idempotency_key, charge_id, payment_method_ref, amount_micros, "
            "currency, status) SELECT provider_idempotency_key, 'ch_again', payment_method_ref, amount_micros, "
            "currency, 'succeeded' FROM top_up_attempts WHERE id LIKE '%:copy'",
        ],
        {},
    ),
    # a usage charge no event recorded (the ledger is append-only: one more entry is what a second debit leaves)
    "usage debited twice": (
        [
            "INSERT INTO ledger_entries (account_id, amount_micros, kind, idempotency_key) "
            "VALUES ('a1', -5, 'usage_charge', 'usage:ghost')",
            "UPDATE accounts SET balance_micros = balance_micros - 5 WHERE id = 'a1'",
        ],
        {},
    ),
    # -- lost effects
    "usage never billed": (
        [
            "INSERT INTO usage_events (idempotency_key, account_id, amount_micros, charged_micros, owed_micros, "
            "recorded_at) VALUES ('u-lost', 'a1', 5, 0, 5, now())"
        ],
        {},
    ),
    "published message never processed": ([], {"published": PUBLISHED | {"never-seen"}}),
    "key never finished": (["UPDATE idempotency_keys SET status = 'waiting_for_funds' WHERE key = 's1'"], {}),
    "message failed": (
        [
            "UPDATE idempotency_keys SET status = 'failed', last_error = 'boom' WHERE key = 's1'",
            # a failure row for operators excuses nothing
            "INSERT INTO failed_messages (message_id, actor_name, queue_name, idempotency_key, error_type, "
            "error_message) VALUES ('m1', 'subscribe', 'billing', 's1', 'lease_expired', 'boom')",
        ],
        {},
    ),
    "designed failure not recorded": ([], {"designed_failures": {"s1"}}),
    "outcome without its charge": (
        [
            "UPDATE idempotency_keys SET result = jsonb_set(result, '{subscription_id}', '\"sub-nope\"') "
            "WHERE key = 's1'"
        ],
        {},
    ),
    # the card was charged (the provider's table) and no credit follows (the ledger is append-only)
    "provider charge never credited": (
        [
            "INSERT INTO fake_provider_charges (idempotency_key, charge_id, payment_method_ref, amount_micros, "
            "currency, status) VALUES ('pk-lost', 'ch_lost', 'pm_card_visa', 5000000, 'USD', 'succeeded')"
        ],
        {},
    ),
    "top-up never settled": (["UPDATE top_up_attempts SET status = 'pending'"], {}),
    "wait never resumed": (
        [
            "INSERT INTO funds_waits (idempotency_key, account_id, actor_name, queue_name, kwargs) "
            "VALUES ('w1', 'a2', 'renew', 'billing', '{}')"
        ],
        {},
    ),
    "outbox row never relayed": (
        [
            "INSERT INTO outbox (message_id, queue_name, actor_name, kwargs) "
            "VALUES ('o1', 'billing', 'revoke_key', '{}')"
        ],
        {},
    ),
    "paid period cut short": (
        [
            "UPDATE subscriptions SET status = 'canceled', canceled_at = current_period_start + interval '1 hour', "
            "cancel_reason = 'canceled_at_period_end' WHERE account_id = 'a1'"
        ],
        {},
    ),
    # -- unpaid entitled periods
    "active past its period end": ([], {"now": datetime.now(UTC) + timedelta(days=40)}),
    "past_due past its grace": (
        [
            "UPDATE subscriptions SET status = 'past_due', past_due_since = now() - interval '4 days', "
            "grace_ends_at = now() - interval '1 day', next_retry_at = now() - interval '1 day' "
            "WHERE account_id = 'a1'"
        ],
        {},
    ),
    "current period never charged": (
        [
            "UPDATE subscriptions SET current_period_start = current_period_start - interval '1 hour' "
            "WHERE account_id = 'a1'"
        ],
        {},
    ),
    "entitlement without a paid subscription": (
        ["UPDATE subscriptions SET status = 'canceled', canceled_at = now() WHERE account_id = 'a1'"],
        {},
    ),
    "active key of a canceled subscription": (
        ["UPDATE subscriptions SET status = 'canceled', canceled_at = now() WHERE account_id = 'a1'"],
        {},
    ),
}


def test_every_check_has_a_corruption():
    assert set(CORRUPTIONS) == set(DOUBLE_CHARGE_CHECKS) | set(LOST_EFFECT_CHECKS) | set(
        UNPAID_ENTITLED_CHECKS
    )


@pytest.fixture
def healthy(services, setup, producer, drain, db):
    """a1 pays pro from its balance (s1); a2 is topped up by its card, then pays the daily plan (s2)."""
    setup(
        plans=[
            {"plan_id": "pro", "price_micros": 20 * USD},
            {"plan_id": "basic-daily", "price_micros": 1 * USD, "interval": "day"},
        ],
        accounts=[
            {"account_id": "a1", "balance_micros": 100 * USD},
            {
                "account_id": "a2",
                "balance_micros": 0,
                "auto_top_up_threshold_micros": 0,
                "auto_top_up_amount_micros": 50 * USD,
                "payment_method_ref": "pm_card_visa",
            },
        ],
    )
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s1")
    producer.subscribe(account_id="a2", plan_id="basic-daily", idempotency_key="s2")
    producer.record_usage(account_id="a1", amount_micros=3 * USD, idempotency_key="u1", meter="llm.tokens")
    drain()
    assert {r["key"]: r["outcome"] for r in db("SELECT key, result->>'outcome' AS outcome FROM idempotency_keys "
                                              "WHERE key IN ('s1', 's2')")} == {"s1": "subscribed", "s2": "subscribed"}  # fmt: skip
    assert db("SELECT status FROM top_up_attempts") == [{"status": "succeeded"}]
    return services


def _count(url: str, corrupt: list[str], overrides: dict[str, Any]) -> PromiseReport:
    from db.config import plain_url

    async def go() -> PromiseReport:
        conn = await asyncpg.connect(plain_url(url))
        try:
            tx = conn.transaction()
            await tx.start()
            try:
                for sql in corrupt:
                    await conn.execute(sql)
                kwargs: dict[str, Any] = {
                    "now": datetime.now(UTC),
                    "published": PUBLISHED,
                    "designed_failures": set(),
                    **overrides,
                }
                return await count_promise(conn, **kwargs)
            finally:
                await tx.rollback()
        finally:
            await conn.close()

    return asyncio.run(go())


def test_a_healthy_database_counts_zero(healthy):
    report = _count(healthy.database_url, [], {})
    assert report.counts and all(n == 0 for n in report.counts.values()), report.counts
    assert (report.double_charges, report.lost_effects, report.unpaid_entitled_periods) == (0, 0, 0)


@pytest.mark.parametrize("check", sorted(CORRUPTIONS))
def test_each_check_counts_its_corruption(healthy, check):
    corrupt, overrides = CORRUPTIONS[check]
    report = _count(healthy.database_url, corrupt, overrides)
    group = "double" if check in DOUBLE_CHARGE_CHECKS else "lost" if check in LOST_EFFECT_CHECKS else "unpaid"
    assert report.counts[f"{group}:{check}"] >= 1, report.counts
    assert report.total(group) >= 1
    # and the healthy state is back (the corruption was rolled back)
    assert _count(healthy.database_url, [], {}).counts[f"{group}:{check}"] == 0
