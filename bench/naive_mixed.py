"""The naive mixed peer: plain Dramatiq + asyncpg actors for the four kinds of the mixed workload.

Run by ``python -m dramatiq bench.naive_mixed --processes P --threads T
--queues bench.naive_mixed`` with ``BENCH_REDIS_URL`` and
``BENCH_DATABASE_URL`` set.  Stock Dramatiq (a plain ``RedisBroker`` with
the ``AsyncIO`` middleware, :mod:`bench.stock`) and an asyncpg pool per
process sized to its threads, four actors on one queue
(:data:`bench.NAIVE_MIXED_QUEUE`): what a competent first version of
``subscribe``, ``renew``, ``auto_top_up`` and ``revoke_key`` would be, with
none of this project's machinery (no delivery counting before the effect,
no leases, no outbox, no signing, no SQLAlchemy, no structured logs).

Each message is one transaction, statement by statement: insert the
idempotency key first (``ON CONFLICT DO NOTHING``: a key already stored is
a duplicate, and the message does nothing), then the effect, then the
outcome stored with the key.  Every kind writes the rows the project's
money path (``db/money/``) writes for the same message, so
``db.audit.run_audit`` with the quiescent checks passes after it:

* ``subscribe`` (:func:`naive_subscribe`): lock the account (``FOR
  UPDATE``), read the plan, look for a live subscription to it
  (``already_active``), check the balance (``insufficient_funds``), insert
  the subscription, the ``subscription_charge`` ledger entry (key
  ``subscribe:{key}``) and the balance's debit, the managed API key (its
  SHA-256 hash only) and the entitlement projection; after the commit, the
  key's plaintext is published on the Redis channel the project uses when
  no public key is configured (``billing:api-keys:issued``, as in the bench).
* ``renew`` (:func:`naive_renew_mixed`): :func:`bench.naive.renew`, the
  naive renewal peer's own transaction (imported, not copied).
* ``auto_top_up`` (:func:`naive_auto_top_up`): lock the account, check
  that auto-top-up is on with a payment method (``not_configured`` /
  ``auto_top_up_disabled``), then call the payment provider *inline, in
  the transaction*, as a first version would: the bench's provider is the
  project's fake one (``BILLING_PAYMENT_PROVIDER=fake``), whose charge is a
  row of ``fake_provider_charges`` in the same database, so the peer's call
  is that row's ``INSERT`` (status ``succeeded``, under the provider key
  ``billing-queue:top-up:{attempt id}``).  Then the attempt row (already
  ``succeeded`` / ``finished``), the ``top_up`` ledger credit (key
  ``top_up:{attempt id}``), the owed usage it collects (a ``usage_charge``
  under ``owed:top_up:{attempt id}``, none in the bench), and the balance.
* ``revoke_key`` (:func:`naive_revoke_key`): find the owner of the
  subscription (or key), revoke its active managed keys (or the one key)
  with one ``UPDATE ... RETURNING``.

What the peer leaves out, and why it is cheaper than the project for it:

* the provider call runs inside the transaction and cannot fail: no
  recovery points, no charge lease, no separate provider transaction, no
  declines, timeouts, processing charges or reconciliation (the bench's
  card ``pm_card_visa`` always succeeds at the fake provider).  With a
  real provider, a charge inside the transaction would hold the account's
  lock for the network call and could charge without a credit on a
  rollback; here it commits or rolls back with the credit, which flatters
  the peer;
* no per-period top-up limit, monthly cap or consecutive-decline counting
  beyond resetting the counter on a success (the bench's limits are never
  reached);
* no auto-top-up trigger or funds wait when a subscribe finds the balance
  short (``insufficient_funds`` at once; the bench's balances never are);
* no sealed API key delivery: no ``api_key_recipients`` look-up and no
  ``api_key_deliveries`` row (the bench configures no public key, so the
  project falls back to the same pub/sub publish);
* ``revoke_key`` takes no account lock (the ``UPDATE`` locks the key rows);
* messages are unsigned and not validated beyond what the SQL rejects.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import dramatiq

from db.periods import period_bounds, top_up_period

from . import NAIVE_MIXED_ACTORS, NAIVE_MIXED_QUEUE
from .naive import renew
from .stock import broker, get_pool

__all__ = [
    "QUEUE",
    "ACTORS",
    "KEY_CHANNEL",
    "broker",
    "naive_subscribe",
    "naive_renew_mixed",
    "naive_auto_top_up",
    "naive_revoke_key",
]

QUEUE = NAIVE_MIXED_QUEUE
ACTORS = NAIVE_MIXED_ACTORS
#: Where a new key's plaintext is published after the commit (``workers.billing.API_KEY_CHANNEL``: the
#: project's delivery when no public key is configured, as in the bench).
KEY_CHANNEL = "billing:api-keys:issued"

_OPTIONS: dict[str, Any] = {"queue_name": QUEUE, "max_retries": 3, "min_backoff": 100, "max_backoff": 1000}


def _fingerprint(kind: str, kwargs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([kind, kwargs], sort_keys=True).encode()).hexdigest()


async def _claim(
    conn: asyncpg.Connection, key: str, kind: str, fingerprint: str, account_id: str | None
) -> bool:
    """Insert the idempotency key (status ``processing``); False when it exists (a duplicate)."""
    inserted = await conn.fetchval(
        "INSERT INTO idempotency_keys (key, kind, fingerprint, status, attempts, account_id) "
        "VALUES ($1, $2, $3, 'processing', 1, $4) ON CONFLICT (key) DO NOTHING RETURNING key",
        key,
        kind,
        fingerprint,
        account_id,
    )
    return inserted is not None


async def _complete(
    conn: asyncpg.Connection, key: str, result: dict[str, Any], account_id: str | None
) -> None:
    """Store the outcome with the key (``completed``), in the effect's transaction."""
    await conn.execute(
        "UPDATE idempotency_keys SET status = 'completed', result = $2::jsonb, "
        "account_id = COALESCE(account_id, $3), completed_at = now(), updated_at = now() WHERE key = $1",
        key,
        json.dumps(result),
        account_id,
    )


@dramatiq.actor(actor_name=ACTORS["subscribe"], **_OPTIONS)
async def naive_subscribe(account_id: str, plan_id: str, idempotency_key: str) -> None:
    """Subscribe ``account_id`` to ``plan_id``: charge the first period and issue a managed API key.

    Outcomes (stored with the key): ``subscribed`` (the plan's price, in
    micros, debited as a ``subscription_charge``), ``already_active`` (a
    non-canceled subscription to the plan exists: no charge) or
    ``insufficient_funds`` (no charge).

    Raises:
      ValueError: An unknown account or plan, or a plan in another currency
        (the transaction rolls back; Dramatiq retries, then dead-letters it).
    """
    kwargs = {"account_id": account_id, "plan_id": plan_id, "idempotency_key": idempotency_key}
    issued: dict[str, Any] | None = None
    pool = await get_pool()
    async with pool.acquire() as conn, conn.transaction():
        if not await _claim(
            conn, idempotency_key, "subscribe", _fingerprint("subscribe", kwargs), account_id
        ):
            return  # a duplicate: its first delivery stored the outcome
        account = await conn.fetchrow(
            "SELECT currency, balance_micros FROM accounts WHERE id = $1 FOR UPDATE", account_id
        )
        if account is None:
            raise ValueError(f"unknown account {account_id!r}")
        plan = await conn.fetchrow(
            "SELECT price_micros, currency, interval, interval_count FROM plans WHERE id = $1", plan_id
        )
        if plan is None:
            raise ValueError(f"unknown plan {plan_id!r}")
        if plan["currency"] != account["currency"]:
            raise ValueError(
                f"plan {plan_id!r} is priced in {plan['currency']}, the account in {account['currency']}"
            )
        price = int(plan["price_micros"])
        live = await conn.fetchrow(
            "SELECT id, status FROM subscriptions WHERE account_id = $1 AND plan_id = $2 AND status <> 'canceled'",
            account_id,
            plan_id,
        )
        result: dict[str, Any]
        if live is not None:
            result = {"outcome": "already_active", "subscription_id": live["id"], "status": live["status"]}
        elif account["balance_micros"] < price:
            result = {
                "outcome": "insufficient_funds",
                "price_micros": price,
                "balance_micros": int(account["balance_micros"]),
            }
        else:
            now = datetime.now(UTC)
            anchor = now.replace(microsecond=0)
            start, end = period_bounds(anchor, plan["interval"], plan["interval_count"], 0)
            subscription_id = "sub_" + uuid.uuid4().hex
            await conn.execute(
                "INSERT INTO subscriptions (id, account_id, plan_id, status, billing_anchor, period_index, "
                "current_period_start, current_period_end, created_by_key, created_at, updated_at) "
                "VALUES ($1, $2, $3, 'active', $4, 0, $5, $6, $7, $8, $8)",
                subscription_id,
                account_id,
                plan_id,
                anchor,
                start,
                end,
                idempotency_key,
                now,
            )
            await conn.execute(
                "INSERT INTO ledger_entries (account_id, amount_micros, kind, subscription_id, period_start, "
                "idempotency_key) VALUES ($1, $2, 'subscription_charge', $3, $4, $5)",
                account_id,
                -price,
                subscription_id,
                start,
                f"subscribe:{idempotency_key}",
            )
            balance = await conn.fetchval(
                "UPDATE accounts SET balance_micros = balance_micros - $2, updated_at = now() WHERE id = $1 "
                "RETURNING balance_micros",
                account_id,
                price,
            )
            key_id = "key_" + uuid.uuid4().hex
            prefix = "bq_" + secrets.token_hex(6)
            plaintext = f"{prefix}.{secrets.token_urlsafe(32)}"
            await conn.execute(
                "INSERT INTO api_keys (id, account_id, subscription_id, source, prefix, key_hash, status, created_at) "
                "VALUES ($1, $2, $3, 'managed', $4, $5, 'active', $6)",
                key_id,
                account_id,
                subscription_id,
                prefix,
                hashlib.sha256(plaintext.encode()).hexdigest(),
                now,
            )
            await conn.execute(
                "INSERT INTO entitlements (account_id, plan_id, subscription_id, status, entitled, current_period_end, "
                "updated_at) VALUES ($1, $2, $3, 'active', true, $4, $5) ON CONFLICT (account_id, plan_id) DO UPDATE "
                "SET subscription_id = EXCLUDED.subscription_id, status = EXCLUDED.status, entitled = EXCLUDED.entitled, "
                "current_period_end = EXCLUDED.current_period_end, grace_ends_at = NULL, updated_at = EXCLUDED.updated_at",
                account_id,
                plan_id,
                subscription_id,
                end,
                now,
            )
            result = {
                "outcome": "subscribed",
                "subscription_id": subscription_id,
                "key_id": key_id,
                "key_prefix": prefix,
                "charged_micros": price,
                "balance_micros": int(balance),
                "current_period_end": end.isoformat(),
            }
            issued = {
                "account_id": account_id,
                "subscription_id": subscription_id,
                "key_id": key_id,
                "prefix": prefix,
                "api_key": plaintext,
            }
        await _complete(conn, idempotency_key, result, account_id)
    if issued is not None:  # committed: hand the key over (best effort, as the project's fallback)
        try:
            await asyncio.to_thread(broker.client.publish, KEY_CHANNEL, json.dumps(issued))
        except Exception:  # noqa: BLE001, S110 - the subscription is committed; the key can be reissued
            pass


@dramatiq.actor(actor_name=ACTORS["renew"], **_OPTIONS)
async def naive_renew_mixed(subscription_id: str, period_start: str, idempotency_key: str) -> None:
    """Renew the period of ``subscription_id`` starting at ``period_start`` (ISO 8601, UTC): :func:`bench.naive.renew`."""
    await renew(subscription_id, period_start, idempotency_key)


@dramatiq.actor(actor_name=ACTORS["auto_top_up"], **_OPTIONS)
async def naive_auto_top_up(
    account_id: str, idempotency_key: str, amount_micros: int | None = None, reason: str | None = None
) -> None:
    """Charge the account's payment method ``amount_micros`` (default: its configured amount) and credit it.

    The provider call is the fake provider's ``fake_provider_charges`` row,
    inserted in this transaction (see the module's docstring).  Outcomes
    (stored with the key): ``topped_up``, ``not_configured`` or
    ``auto_top_up_disabled`` (nothing charged).

    Raises:
      ValueError: An unknown account (the transaction rolls back; Dramatiq retries).
    """
    kwargs = {"account_id": account_id, "amount_micros": amount_micros, "idempotency_key": idempotency_key}
    pool = await get_pool()
    async with pool.acquire() as conn, conn.transaction():
        if not await _claim(
            conn, idempotency_key, "auto_top_up", _fingerprint("auto_top_up", kwargs), account_id
        ):
            return  # a duplicate: its first delivery stored the outcome
        account = await conn.fetchrow(
            "SELECT currency, balance_micros, owed_micros, auto_top_up_enabled, auto_top_up_amount_micros, "
            "payment_method_ref, auto_top_up_disabled_reason FROM accounts WHERE id = $1 FOR UPDATE",
            account_id,
        )
        if account is None:
            raise ValueError(f"unknown account {account_id!r}")
        result: dict[str, Any]
        if not account["auto_top_up_enabled"] or not account["payment_method_ref"]:
            disabled = account["auto_top_up_disabled_reason"]
            result = {
                "outcome": "auto_top_up_disabled" if disabled else "not_configured",
                "account_id": account_id,
                **({"reason": disabled} if disabled else {}),
            }
        else:
            now = datetime.now(UTC)
            amount = amount_micros or int(account["auto_top_up_amount_micros"])
            currency = account["currency"].strip()
            attempt_id = "tua_" + uuid.uuid4().hex
            provider_key = f"billing-queue:top-up:{attempt_id}"
            charge_id = "ch_fake_" + uuid.uuid4().hex
            # the provider call, inline: the fake provider's charge is this row
            await conn.execute(
                "INSERT INTO fake_provider_charges (idempotency_key, charge_id, payment_method_ref, amount_micros, "
                "currency, status, created_at) VALUES ($1, $2, $3, $4, $5, 'succeeded', $6)",
                provider_key,
                charge_id,
                account["payment_method_ref"],
                amount,
                currency,
                now,
            )
            await conn.execute(
                "INSERT INTO top_up_attempts (id, account_id, message_idempotency_key, provider_idempotency_key, "
                "amount_micros, currency, payment_method_ref, billing_period, status, recovery_point, "
                "provider_charge_id, reason, created_at, updated_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'succeeded', 'finished', $9, $10, $11, $11)",
                attempt_id,
                account_id,
                idempotency_key,
                provider_key,
                amount,
                currency,
                account["payment_method_ref"],
                top_up_period(now),
                charge_id,
                reason,
                now,
            )
            await conn.execute(
                "INSERT INTO ledger_entries (account_id, amount_micros, kind, top_up_attempt_id, idempotency_key) "
                "VALUES ($1, $2, 'top_up', $3, $4)",
                account_id,
                amount,
                attempt_id,
                f"top_up:{attempt_id}",
            )
            # a credit first collects the usage the account owes (as the money path does)
            collect = min(int(account["owed_micros"]), int(account["balance_micros"]) + amount)
            if collect > 0:
                await conn.execute(
                    "INSERT INTO ledger_entries (account_id, amount_micros, kind, idempotency_key) "
                    "VALUES ($1, $2, 'usage_charge', $3)",
                    account_id,
                    -collect,
                    f"owed:top_up:{attempt_id}",
                )
            balance = await conn.fetchval(
                "UPDATE accounts SET balance_micros = balance_micros + $2 - $3, owed_micros = owed_micros - $3, "
                "auto_top_up_consecutive_declines = 0, updated_at = now() WHERE id = $1 RETURNING balance_micros",
                account_id,
                amount,
                collect,
            )
            result = {
                "outcome": "topped_up",
                "attempt_id": attempt_id,
                "amount_micros": amount,
                "charge_id": charge_id,
                "balance_micros": int(balance),
            }
        await _complete(conn, idempotency_key, result, account_id)


@dramatiq.actor(actor_name=ACTORS["revoke_key"], **_OPTIONS)
async def naive_revoke_key(
    reason: str, idempotency_key: str, subscription_id: str | None = None, key_id: str | None = None
) -> None:
    """Revoke one key (``key_id``, any source) or the active managed keys of ``subscription_id``.

    Outcomes (stored with the key, with the account and the revoked key
    ids): ``revoked``, or ``already_revoked`` when no active key matched.

    Raises:
      ValueError: Neither or both of ``subscription_id`` and ``key_id``, or
        an unknown subscription or key (the transaction rolls back).
    """
    if (subscription_id is None) == (key_id is None):
        raise ValueError("exactly one of subscription_id and key_id is required")
    kwargs = {
        "subscription_id": subscription_id,
        "key_id": key_id,
        "reason": reason,
        "idempotency_key": idempotency_key,
    }
    pool = await get_pool()
    async with pool.acquire() as conn, conn.transaction():
        if not await _claim(conn, idempotency_key, "revoke_key", _fingerprint("revoke_key", kwargs), None):
            return  # a duplicate: its first delivery stored the outcome
        if key_id is not None:
            owner = await conn.fetchval("SELECT account_id FROM api_keys WHERE id = $1", key_id)
            rows = await conn.fetch(
                "UPDATE api_keys SET status = 'revoked', revoked_at = now(), revoke_reason = $2 "
                "WHERE id = $1 AND status = 'active' RETURNING id",
                key_id,
                reason,
            )
        else:
            owner = await conn.fetchval("SELECT account_id FROM subscriptions WHERE id = $1", subscription_id)
            rows = await conn.fetch(
                "UPDATE api_keys SET status = 'revoked', revoked_at = now(), revoke_reason = $2 "
                "WHERE subscription_id = $1 AND source = 'managed' AND status = 'active' RETURNING id",
                subscription_id,
                reason,
            )
        if owner is None:
            raise ValueError(
                f"unknown {'API key' if key_id else 'subscription'} {key_id or subscription_id!r}"
            )
        key_ids = sorted(r["id"] for r in rows)
        result = {
            "outcome": "revoked" if key_ids else "already_revoked",
            "account_id": owner,
            "key_ids": key_ids,
        }
        await _complete(conn, idempotency_key, result, owner)
