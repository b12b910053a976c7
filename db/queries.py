"""Read-only queries for operators and the CLI (nothing here moves money)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["account_snapshot"]


def _plain(row: Any) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in dict(row).items()}


async def account_snapshot(engine: AsyncEngine, account_id: str) -> dict[str, Any] | None:
    """Balance, subscriptions, API keys (no hashes, no secrets), ledger and top-ups of an account.

    Returns None for an unknown account.
    """
    async with engine.connect() as conn:
        account = (
            await conn.execute(
                text(
                    """
                    SELECT id, currency, balance_micros, auto_top_up_enabled, auto_top_up_threshold_micros,
                           auto_top_up_amount_micros, payment_method_ref IS NOT NULL AS has_payment_method,
                           auto_top_up_consecutive_declines, auto_top_up_disabled_reason, created_at, updated_at
                    FROM accounts WHERE id = :id
                    """
                ),
                {"id": account_id},
            )
        ).mappings().one_or_none()
        if account is None:
            return None
        subs = (
            await conn.execute(
                text(
                    """
                    SELECT id, plan_id, status, current_period_start, current_period_end, cancel_at_period_end,
                           canceled_at, cancel_reason FROM subscriptions WHERE account_id = :id ORDER BY created_at
                    """
                ),
                {"id": account_id},
            )
        ).mappings().all()
        keys = (
            await conn.execute(
                text(
                    """
                    SELECT id, subscription_id, source, prefix, status, created_at, revoked_at, revoke_reason
                    FROM api_keys WHERE account_id = :id ORDER BY created_at
                    """
                ),
                {"id": account_id},
            )
        ).mappings().all()
        ledger = (
            await conn.execute(
                text(
                    """
                    SELECT id, amount_micros, kind, subscription_id, period_start, top_up_attempt_id,
                           idempotency_key, created_at FROM ledger_entries WHERE account_id = :id ORDER BY id
                    """
                ),
                {"id": account_id},
            )
        ).mappings().all()
        top_ups = (
            await conn.execute(
                text(
                    """
                    SELECT id, amount_micros, status, billing_period, provider_charge_id, decline_reason, created_at
                    FROM top_up_attempts WHERE account_id = :id ORDER BY created_at
                    """
                ),
                {"id": account_id},
            )
        ).mappings().all()
        entitlements = (
            await conn.execute(
                text("SELECT plan_id, subscription_id, status, entitled, current_period_end FROM entitlements WHERE account_id = :id"),
                {"id": account_id},
            )
        ).mappings().all()
    return {
        "account": _plain(account),
        "subscriptions": [_plain(r) for r in subs],
        "api_keys": [_plain(r) for r in keys],
        "ledger": [_plain(r) for r in ledger],
        "top_up_attempts": [_plain(r) for r in top_ups],
        "entitlements": [_plain(r) for r in entitlements],
    }
