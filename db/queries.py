"""Read-only queries for operators and the CLI (nothing here moves money)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["account_snapshot"]


#: The parts of an account snapshot; API keys without hashes, the account
#: without its payment method reference.
_ACCOUNT_PARTS = {
    "subscriptions": """
        SELECT id, plan_id, status, current_period_start, current_period_end, cancel_at_period_end,
               past_due_since, grace_ends_at, next_retry_at, dunning_attempts,
               canceled_at, cancel_reason FROM subscriptions WHERE account_id = :id ORDER BY created_at
        """,
    "api_keys": """
        SELECT id, subscription_id, source, prefix, status, created_at, revoked_at, revoke_reason
        FROM api_keys WHERE account_id = :id ORDER BY created_at
        """,
    "ledger": """
        SELECT id, amount_micros, kind, subscription_id, period_start, top_up_attempt_id,
               idempotency_key, created_at FROM ledger_entries WHERE account_id = :id ORDER BY id
        """,
    "top_up_attempts": """
        SELECT id, amount_micros, status, billing_period, provider_charge_id, decline_reason, created_at
        FROM top_up_attempts WHERE account_id = :id ORDER BY created_at
        """,
    "entitlements": """
        SELECT plan_id, subscription_id, status, entitled, current_period_end, grace_ends_at
        FROM entitlements WHERE account_id = :id ORDER BY plan_id
        """,
    # usage by meter and by day (UTC), from the events' own rows (index usage_events_account)
    "usage": """
        SELECT (recorded_at AT TIME ZONE 'UTC')::date AS day, COALESCE(meter, '') AS meter,
               count(*) AS events, COALESCE(sum(quantity), 0)::bigint AS quantity,
               sum(amount_micros)::bigint AS amount_micros, sum(charged_micros)::bigint AS charged_micros,
               sum(owed_micros)::bigint AS owed_at_record_micros
        FROM usage_events WHERE account_id = :id
        GROUP BY 1, 2 ORDER BY 1 DESC, 2 LIMIT 400
        """,
}


def _plain(row: Any) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in dict(row).items()}


async def account_snapshot(engine: AsyncEngine, account_id: str) -> dict[str, Any] | None:
    """Balance, owed usage and ``has_credits``, subscriptions, API keys (no hashes, no secrets), ledger,
    top-ups, entitlements and usage by day and meter of an account (micros, UTC).

    Returns None for an unknown account.
    """
    async with engine.connect() as conn:
        account = (
            (
                await conn.execute(
                    text(
                        """
                    SELECT a.id, a.currency, a.balance_micros, a.owed_micros, e.has_credits,
                           a.auto_top_up_enabled, a.auto_top_up_threshold_micros,
                           a.auto_top_up_amount_micros, a.payment_method_ref IS NOT NULL AS has_payment_method,
                           a.auto_top_up_monthly_cap_micros, a.auto_top_up_max_per_period,
                           a.auto_top_up_consecutive_declines,
                           a.auto_top_up_disabled_reason, a.auto_top_up_disabled_at, a.created_at, a.updated_at
                    FROM accounts a LEFT JOIN account_entitlements e ON e.account_id = a.id
                    WHERE a.id = :id
                    """
                    ),
                    {"id": account_id},
                )
            )
            .mappings()
            .one_or_none()
        )
        if account is None:
            return None
        parts = {}
        for name, sql in _ACCOUNT_PARTS.items():
            rows = (await conn.execute(text(sql), {"id": account_id})).mappings().all()
            parts[name] = [_plain(r) for r in rows]
    return {"account": _plain(account), **parts}
