"""The naive usage peer: a plain Dramatiq + asyncpg actor debiting one usage event per transaction.

Run by ``python -m dramatiq bench.naive_usage --processes P --threads T``
with ``BENCH_REDIS_URL`` and ``BENCH_DATABASE_URL`` set.  Stock Dramatiq (a
plain ``RedisBroker`` with the ``AsyncIO`` middleware) and an asyncpg pool
per process sized to its threads: what a competent first version of a
usage actor would be, with none of this project's machinery (no group
commit, no delivery counting before the effect, no outbox, no signing, no
SQLAlchemy).

One transaction per event, in separate statements: insert the idempotency
key (a repeat is a duplicate), lock the account with ``SELECT ... FOR
UPDATE``, debit what the balance covers (the ledger row, then the balance
and the owed amount), record the event and store the outcome.  Every event
of a hot account waits on that one row lock.  It writes the rows the money
path writes, so ``billing audit`` passes.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

import dramatiq

from . import NAIVE_USAGE_ACTOR, NAIVE_USAGE_QUEUE
from .stock import broker, get_pool

__all__ = ["QUEUE", "ACTOR", "broker", "naive_record_usage"]

QUEUE = NAIVE_USAGE_QUEUE
ACTOR = NAIVE_USAGE_ACTOR


@dramatiq.actor(actor_name=ACTOR, queue_name=QUEUE, max_retries=3, min_backoff=100, max_backoff=1000)
async def naive_record_usage(
    account_id: str, amount_micros: int, idempotency_key: str, meter: str | None = None, quantity: int | None = None,
    occurred_at: str | None = None,
) -> None:  # fmt: skip
    """Debit ``amount_micros`` of usage from ``account_id`` once per ``idempotency_key``; owe the rest."""
    fingerprint = hashlib.sha256(
        json.dumps([account_id, amount_micros, idempotency_key]).encode()
    ).hexdigest()
    pool = await get_pool()
    async with pool.acquire() as conn, conn.transaction():
        inserted = await conn.fetchval(
            "INSERT INTO idempotency_keys (key, kind, fingerprint, status, attempts, account_id) "
            "VALUES ($1, 'record_usage', $2, 'processing', 1, $3) ON CONFLICT (key) DO NOTHING RETURNING key",
            idempotency_key,
            fingerprint,
            account_id,
        )
        if inserted is None:
            return  # a duplicate: its first delivery stored the outcome
        balance = await conn.fetchval(
            "SELECT balance_micros FROM accounts WHERE id = $1 FOR UPDATE", account_id
        )
        if balance is None:
            raise ValueError(f"unknown account {account_id!r}")
        charged = min(int(balance), amount_micros)
        entry = None
        if charged > 0:
            entry = await conn.fetchval(
                "INSERT INTO ledger_entries (account_id, amount_micros, kind, idempotency_key) "
                "VALUES ($1, $2, 'usage_charge', $3) RETURNING id",
                account_id,
                -charged,
                f"usage:{idempotency_key}",
            )
        await conn.execute(
            "UPDATE accounts SET balance_micros = balance_micros - $2, owed_micros = owed_micros + $3, "
            "updated_at = now() WHERE id = $1",
            account_id,
            charged,
            amount_micros - charged,
        )
        await conn.execute(
            "INSERT INTO usage_events (idempotency_key, account_id, meter, quantity, amount_micros, charged_micros, "
            "owed_micros, ledger_entry_id, occurred_at, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now())",
            idempotency_key,
            account_id,
            meter,
            quantity,
            amount_micros,
            charged,
            amount_micros - charged,
            entry,
            datetime.fromisoformat(occurred_at) if occurred_at else None,
        )
        result = {
            "outcome": "usage_recorded",
            "account_id": account_id,
            "amount_micros": amount_micros,
            "charged_micros": charged,
            "owed_micros": amount_micros - charged,
            "balance_micros": int(balance) - charged,
            "ledger_entry_id": entry,
        }
        await conn.execute(
            "UPDATE idempotency_keys SET status = 'completed', result = $2::jsonb, completed_at = now(), "
            "updated_at = now() WHERE key = $1",
            idempotency_key,
            json.dumps(result),
        )
