"""The naive baseline: a plain Dramatiq + asyncpg actor renewing a subscription, statement by statement.

Run by ``python -m dramatiq bench.naive --processes P --threads T`` with
``BENCH_REDIS_URL`` and ``BENCH_DATABASE_URL`` set.  Stock Dramatiq (a plain
``RedisBroker`` with the ``AsyncIO`` middleware) and an asyncpg pool per
process sized to its threads: what a competent first version of the
``renew`` actor would be, with none of this project's machinery (no
delivery counting before the effect, no outbox, no signing, no SQLAlchemy,
no key lock, no structured logs).

One transaction, in separate statements: insert the idempotency key (a
repeat is a duplicate), read the subscription, lock the account, check the
balance, insert the ledger row, update the balance, update the
subscription, update the entitlement projection, store the outcome.  It
writes the same rows as the money path, so ``billing audit`` passes.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

import dramatiq

from db.periods import period_bounds

from . import NAIVE_ACTOR, NAIVE_QUEUE
from .stock import broker, get_pool

__all__ = ["QUEUE", "ACTOR", "broker", "naive_renew", "renew"]

QUEUE = NAIVE_QUEUE
ACTOR = NAIVE_ACTOR


@dramatiq.actor(actor_name=ACTOR, queue_name=QUEUE, max_retries=3, min_backoff=100, max_backoff=1000)
async def naive_renew(subscription_id: str, period_start: str, idempotency_key: str) -> None:
    """Charge the period of ``subscription_id`` starting at ``period_start`` and advance it (:func:`renew`)."""
    await renew(subscription_id, period_start, idempotency_key)


async def renew(subscription_id: str, period_start: str, idempotency_key: str) -> None:
    """The naive renewal, one transaction on the process's pool (also the renew of :mod:`bench.naive_mixed`).

    Parameters:
      subscription_id: The subscription to renew.
      period_start: ISO 8601 (UTC) start of the period asked for: its current
        period's end, else the outcome is ``not_due`` (nothing charged).
      idempotency_key: Stored first; a key already stored is a duplicate and does nothing.

    Outcomes (stored with the key): ``renewed`` (the plan's price in micros
    debited as a ``renewal_charge``), ``insufficient_funds`` or ``not_due``.

    Raises:
      ValueError: An unknown subscription (the transaction rolls back; Dramatiq retries).
    """
    start_asked = datetime.fromisoformat(period_start)
    fingerprint = hashlib.sha256(
        json.dumps([subscription_id, period_start, idempotency_key]).encode()
    ).hexdigest()
    pool = await get_pool()
    async with pool.acquire() as conn, conn.transaction():
        inserted = await conn.fetchval(
            "INSERT INTO idempotency_keys (key, kind, fingerprint, status, attempts) "
            "VALUES ($1, 'renew', $2, 'processing', 1) ON CONFLICT (key) DO NOTHING RETURNING key",
            idempotency_key,
            fingerprint,
        )
        if inserted is None:
            return  # a duplicate: its first delivery stored the outcome
        sub = await conn.fetchrow(
            "SELECT s.account_id, s.plan_id, s.billing_anchor, s.period_index, s.current_period_end, "
            "p.price_micros, p.interval, p.interval_count "
            "FROM subscriptions s JOIN plans p ON p.id = s.plan_id WHERE s.id = $1",
            subscription_id,
        )
        if sub is None:
            raise ValueError(f"unknown subscription {subscription_id!r}")
        balance = await conn.fetchval(
            "SELECT balance_micros FROM accounts WHERE id = $1 FOR UPDATE", sub["account_id"]
        )
        result: dict[str, Any] = {
            "subscription_id": subscription_id,
            "account_id": sub["account_id"],
            "period_start": start_asked.isoformat(),
        }
        price = int(sub["price_micros"])
        if sub["current_period_end"] != start_asked:
            result["outcome"] = "not_due"
        elif balance < price:
            result["outcome"] = "insufficient_funds"
        else:
            index = sub["period_index"] + 1
            start, end = period_bounds(sub["billing_anchor"], sub["interval"], sub["interval_count"], index)
            await conn.execute(
                "INSERT INTO ledger_entries (account_id, amount_micros, kind, subscription_id, period_start, "
                "idempotency_key) VALUES ($1, $2, 'renewal_charge', $3, $4, $5)",
                sub["account_id"],
                -price,
                subscription_id,
                start,
                f"renewal:{subscription_id}:{start.isoformat()}",
            )
            await conn.execute(
                "UPDATE accounts SET balance_micros = balance_micros - $2, updated_at = now() WHERE id = $1",
                sub["account_id"],
                price,
            )
            await conn.execute(
                "UPDATE subscriptions SET period_index = $2, current_period_start = $3, current_period_end = $4, "
                "updated_at = now() WHERE id = $1",
                subscription_id,
                index,
                start,
                end,
            )
            await conn.execute(
                "UPDATE entitlements SET current_period_end = $3, updated_at = now() "
                "WHERE account_id = $1 AND plan_id = $2",
                sub["account_id"],
                sub["plan_id"],
                end,
            )
            result.update(outcome="renewed", charged_micros=price, current_period_end=end.isoformat())
        await conn.execute(
            "UPDATE idempotency_keys SET status = 'completed', result = $2::jsonb, account_id = $3, "
            "completed_at = now(), updated_at = now() WHERE key = $1",
            idempotency_key,
            json.dumps(result),
            sub["account_id"],
        )
