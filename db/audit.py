"""The independent checker: read-only SQL that verifies SPEC's invariants.

Safe to run in production (SELECTs only, no locks beyond a snapshot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["AuditReport", "run_audit", "CHECKS"]

#: name -> (description, SQL returning one row per violation)
CHECKS: dict[str, tuple[str, str]] = {
    "ledger_equals_balance": (
        "balance_micros equals the sum of the account's ledger entries",
        """
        SELECT a.id AS account_id, a.balance_micros, COALESCE(l.total, 0) AS ledger_sum
        FROM accounts a LEFT JOIN (
            SELECT account_id, sum(amount_micros)::bigint AS total FROM ledger_entries GROUP BY account_id) l
          ON l.account_id = a.id
        WHERE a.balance_micros <> COALESCE(l.total, 0)
        """,
    ),
    "no_negative_balance": (
        "no balance is negative",
        "SELECT id AS account_id, balance_micros FROM accounts WHERE balance_micros < 0",
    ),
    "period_charged_once": (
        "no subscription period is charged twice",
        """
        SELECT subscription_id, period_start, count(*) AS charges FROM ledger_entries
        WHERE kind IN ('subscription_charge', 'renewal_charge')
        GROUP BY subscription_id, period_start HAVING count(*) > 1
        """,
    ),
    "provider_charge_credited_once": (
        "each succeeded provider charge is credited exactly once, through one attempt (attempts in flight excepted)",
        """
        SELECT c.idempotency_key, count(DISTINCT t.id) AS attempts, count(l.id) AS credits
        FROM fake_provider_charges c
        LEFT JOIN top_up_attempts t ON t.provider_idempotency_key = c.idempotency_key
        LEFT JOIN ledger_entries l ON l.top_up_attempt_id = t.id AND l.kind = 'top_up'
        WHERE c.status = 'succeeded' AND (t.id IS NULL OR t.status <> 'pending')
        GROUP BY c.idempotency_key HAVING count(DISTINCT t.id) <> 1 OR count(l.id) <> 1
        """,
    ),
    "top_up_credit_has_charge": (
        "each top-up ledger credit has a succeeded provider charge of the same amount",
        """
        SELECT l.id AS ledger_entry_id, t.id AS attempt_id FROM ledger_entries l
        JOIN top_up_attempts t ON t.id = l.top_up_attempt_id
        WHERE l.kind = 'top_up' AND (t.status <> 'succeeded' OR t.provider_charge_id IS NULL
              OR l.amount_micros <> t.amount_micros)
        """,
    ),
    "outcome_matches_ledger": (
        "each renewed / subscribed outcome has its charge: the period and subscription the outcome names",
        """
        SELECT k.key, k.kind, k.result->>'outcome' AS outcome FROM idempotency_keys k
        WHERE k.status = 'completed' AND k.kind IN ('renew', 'subscribe')
          AND k.result->>'outcome' IN ('renewed', 'subscribed')
          AND NOT EXISTS (
              SELECT 1 FROM ledger_entries l
              WHERE l.kind IN ('subscription_charge', 'renewal_charge')
                AND l.subscription_id = k.result->>'subscription_id'
                AND (k.kind = 'subscribe' OR l.period_start = (k.result->>'period_start')::timestamptz))
        """,
    ),
    "entitlement_matches_subscription": (
        "the entitlement projection agrees with its subscription (updated in the same transaction)",
        """
        SELECT e.account_id, e.plan_id, e.subscription_id, e.status AS projected, s.status
        FROM entitlements e JOIN subscriptions s ON s.id = e.subscription_id
        WHERE e.status <> s.status OR e.entitled <> (s.status IN ('active', 'past_due'))
           OR e.current_period_end IS DISTINCT FROM s.current_period_end
           OR (s.status = 'past_due' AND e.grace_ends_at IS DISTINCT FROM s.grace_ends_at)
        """,
    ),
    "past_due_state_complete": (
        "past_due subscriptions, and only they, carry a grace period and a next retry",
        """
        SELECT id AS subscription_id, status, past_due_since, grace_ends_at, next_retry_at
        FROM subscriptions
        WHERE (status = 'past_due') <> (past_due_since IS NOT NULL AND grace_ends_at IS NOT NULL
                                        AND next_retry_at IS NOT NULL AND next_retry_at <= grace_ends_at)
        """,
    ),
    # owner: the consumer of the subscriber's private key (`billing keys fetch`,
    # examples/key_consumer.py); deadline: deliver_by, BILLING_KEY_DELIVERY_DEADLINE_MS
    # after the key was issued (written with the row, from the money path's clock)
    "api_key_delivery_acknowledged": (
        "every sealed API key delivery is acknowledged by its consumer before its deadline",
        """
        SELECT id AS delivery_id, key_id, account_id, reason, created_at, deliver_by
        FROM api_key_deliveries WHERE status = 'pending' AND deliver_by < now()
        """,
    ),
}

#: Checks that only hold once the queues are drained (work still in flight otherwise).
QUIESCENT_CHECKS: dict[str, tuple[str, str]] = {
    # the cancel commits with its revoke_key in the outbox; the keys follow a moment later
    # (the entitlement projection flips in the cancel's own transaction)
    "no_active_managed_key_on_canceled": (
        "no active managed API key belongs to a canceled subscription",
        """
        SELECT k.id AS key_id, k.subscription_id FROM api_keys k JOIN subscriptions s ON s.id = k.subscription_id
        WHERE k.source = 'managed' AND k.status = 'active' AND s.status = 'canceled'
        """,
    ),
    "no_pending_top_up": (
        "no top-up attempt is left pending (answer recorded, or its failure visible to operators)",
        """
        SELECT id AS attempt_id, account_id FROM top_up_attempts t WHERE status = 'pending'
          AND NOT EXISTS (SELECT 1 FROM failed_messages f WHERE f.idempotency_key = t.message_idempotency_key)
        """,
    ),
    "no_unfinished_keys": (
        "every message key is finished (completed, or failed/dead and visible to operators)",
        """
        SELECT key, kind, status FROM idempotency_keys k
        WHERE status IN ('processing', 'waiting_for_funds')
          AND NOT EXISTS (SELECT 1 FROM failed_messages f WHERE f.idempotency_key = k.key)
        """,
    ),
    "outbox_relayed": ("the outbox is empty", "SELECT message_id, actor_name FROM outbox"),
}


@dataclass
class AuditReport:
    """Violations by check name (an empty list: the check passed)."""

    violations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


async def run_audit(engine: AsyncEngine, *, quiescent: bool = False, limit: int = 20) -> AuditReport:
    """Run every check in one REPEATABLE READ snapshot.

    Parameters:
      quiescent: Also run the checks that need drained queues.
      limit: Violations listed per check (at most).
    """
    report = AuditReport()
    checks = {**CHECKS, **(QUIESCENT_CHECKS if quiescent else {})}
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            await conn.execute(text("SET TRANSACTION READ ONLY"))
            for name, (description, sql) in checks.items():
                rows = (
                    (await conn.execute(text(f"SELECT * FROM ({sql}) v LIMIT {int(limit)}"))).mappings().all()
                )
                report.violations[name] = [{k: _plain(v) for k, v in r.items()} for r in rows]
                report.descriptions[name] = description
    return report


def _plain(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value
