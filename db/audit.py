"""The independent checker: read-only SQL that verifies SPEC's invariants.

Safe to run in production (SELECTs only, no locks beyond a snapshot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .deadlines import LIVE_TOP_UP, OWED_TOP_UP_DUE
from .money.policy import BillingPolicy
from .periods import top_up_period

__all__ = ["AuditDeadlines", "AuditReport", "run_audit", "CHECKS", "QUIESCENT_CHECKS"]

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
    # usage (record_usage): what was applied is charged or owed, owed usage is collected first by
    # the next credit, each event once, and the replica-safe flag agrees with the account
    "usage_charged_or_owed": (
        "the usage applied to each account equals its usage_charge ledger entries plus what it owes",
        """
        SELECT a.id AS account_id, COALESCE(u.applied, 0) AS usage_micros,
               COALESCE(l.charged, 0) AS usage_charged_micros, a.owed_micros
        FROM accounts a
        LEFT JOIN (SELECT account_id, sum(amount_micros)::bigint AS applied FROM usage_events
                   GROUP BY account_id) u ON u.account_id = a.id
        LEFT JOIN (SELECT account_id, (-sum(amount_micros))::bigint AS charged FROM ledger_entries
                   WHERE kind = 'usage_charge' GROUP BY account_id) l ON l.account_id = a.id
        WHERE COALESCE(u.applied, 0) <> COALESCE(l.charged, 0) + a.owed_micros
        """,
    ),
    "owed_usage_collected": (
        "owed usage is collected by the next credit: no account owes usage while its balance is above zero",
        "SELECT id AS account_id, balance_micros, owed_micros FROM accounts WHERE owed_micros > 0 AND balance_micros > 0",
    ),
    "usage_applied_once": (
        "each usage event key is applied once: its event row, its completed key, and batch entries that "
        "equal their events' charges",
        """
        SELECT 'ledger entry' AS what, l.idempotency_key AS key, (-l.amount_micros)::bigint AS ledger_micros,
               COALESCE(sum(u.charged_micros), 0)::bigint AS events_micros
        FROM ledger_entries l LEFT JOIN usage_events u ON u.ledger_entry_id = l.id
        WHERE l.kind = 'usage_charge' AND l.idempotency_key LIKE 'usage:%'
        GROUP BY l.id HAVING -l.amount_micros <> COALESCE(sum(u.charged_micros), 0)
        UNION ALL
        SELECT 'completed key without its event', k.key, NULL::bigint, NULL::bigint FROM idempotency_keys k
        WHERE k.kind = 'record_usage' AND k.status = 'completed' AND NOT EXISTS (
            SELECT 1 FROM usage_events u WHERE u.idempotency_key = k.key
              AND u.amount_micros = (k.result->>'amount_micros')::bigint)
        UNION ALL
        SELECT 'event without its completed key', u.idempotency_key, NULL::bigint, NULL::bigint
        FROM usage_events u WHERE NOT EXISTS (
            SELECT 1 FROM idempotency_keys k
            WHERE k.key = u.idempotency_key AND k.kind = 'record_usage' AND k.status = 'completed')
        """,
    ),
    "has_credits_matches_account": (
        "has_credits (account_entitlements) is true exactly while the balance is above zero and nothing is owed",
        """
        SELECT a.id AS account_id, a.balance_micros, a.owed_micros, e.has_credits
        FROM accounts a LEFT JOIN account_entitlements e ON e.account_id = a.id
        WHERE e.has_credits IS DISTINCT FROM (a.balance_micros > 0 AND a.owed_micros = 0)
        """,
    ),
    # owner: the consumer of the subscriber's private key (`billing keys fetch`,
    # examples/key_consumer.py); deadline: deliver_by, BILLING_KEY_DELIVERY_DEADLINE_MS
    # after the key was issued (written with the row, from the money path's clock)
    "api_key_delivery_acknowledged": (
        "every sealed API key delivery is acknowledged by its consumer before its deadline",
        """
        SELECT id AS delivery_id, key_id, account_id, reason, created_at, deliver_by
        FROM api_key_deliveries WHERE status = 'pending' AND deliver_by < CAST(:now AS timestamptz)
        """,
    ),
    # a message that failed for good is kept for operators: its key's end and its failed_messages
    # row commit in one transaction (workers.billing.BillingService.record_failure,
    # db.deadlines.end_key). A renewal the completer ended without a stored request has no message
    # to keep; its period is the scheduler's to send again (no_unpaid_entitled_period).
    "failed_key_recorded": (
        "every failed or dead key has its failure record for operators (failed_messages)",
        """
        SELECT k.key, k.kind, k.status, k.account_id, k.last_error FROM idempotency_keys k
        WHERE k.status IN ('failed', 'dead') AND NOT (k.kind = 'renew' AND k.request IS NULL)
          AND NOT EXISTS (SELECT 1 FROM failed_messages f WHERE f.idempotency_key = k.key)
        """,
    ),
    # -- every state that waits has an owner and a deadline (docs/lifecycle.md "States that wait");
    # -- past its deadline (plus :slack, one owner's pass) the state is flagged, whatever
    # -- failed_messages says: a failure row is not an answer for the customer.
    # owner: the scheduler's due scan and the renew actor; deadline: period end + :renewal_deadline
    "no_unpaid_entitled_period": (
        "no subscription is entitled past its period end without paying for the period it is in "
        "(active past period end + the renewal deadline, or past_due past the end of its grace)",
        """
        SELECT s.id AS subscription_id, s.account_id, s.status, s.current_period_end, s.grace_ends_at,
               e.entitled
        FROM subscriptions s LEFT JOIN entitlements e ON e.subscription_id = s.id
        CROSS JOIN (SELECT CAST(:now AS timestamptz) - CAST(:renewal_deadline AS interval) AS t) late
        WHERE (s.status = 'active' AND s.current_period_end < late.t)
           OR (s.status = 'past_due' AND s.grace_ends_at < late.t)
        """,
    ),
    # owner: the top-up message, then the reconciler; deadline: reconcile_after (+ :slack);
    # processing at the provider: :processing_deadline after the attempt
    "top_up_within_deadline": (
        "no top-up attempt is pending past its deadline (the reconciler looks at each by reconcile_after; "
        "one still processing at the provider after the processing deadline needs an operator)",
        """
        SELECT id AS attempt_id, account_id, created_at, reconcile_after, provider_status
        FROM top_up_attempts
        WHERE status = 'pending'
          AND (reconcile_after IS NULL OR reconcile_after < CAST(:now AS timestamptz) - CAST(:slack AS interval)
               OR created_at < CAST(:now AS timestamptz) - CAST(:processing_deadline AS interval))
        """,
    ),
    # owner: the top-up the wait is for, then the completer
    "waits_have_a_live_top_up": (
        "every message waiting for funds has a top-up still coming (and a wait row that resumes it)",
        f"""
        SELECT k.key, k.kind, k.account_id, 'key' AS what FROM idempotency_keys k
        WHERE k.status = 'waiting_for_funds'
          AND (NOT {LIVE_TOP_UP.format(account="k.account_id")}
               OR NOT EXISTS (SELECT 1 FROM funds_waits w WHERE w.idempotency_key = k.key))
        UNION ALL
        SELECT w.idempotency_key, w.actor_name, w.account_id, 'funds_waits' FROM funds_waits w
        WHERE NOT {LIVE_TOP_UP.format(account="w.account_id")}
        """,
    ),
    # owner: the completer, which asks for the top-up (db.deadlines.request_owed_top_up);
    # deadline: one pass after the account's last debit or top-up attempt
    "owed_usage_has_a_top_up_coming": (
        "owed usage of an account with auto-top-up on has a top-up coming, unless the month's top-ups "
        "are used up or one is still processing at the provider",
        f"""
        SELECT a.id AS account_id, a.owed_micros, c.last_activity
        FROM accounts a
        CROSS JOIN LATERAL (
            SELECT GREATEST((SELECT max(u.recorded_at) FROM usage_events u WHERE u.account_id = a.id),
                            (SELECT max(t.updated_at) FROM top_up_attempts t WHERE t.account_id = a.id),
                            (SELECT max(k.updated_at) FROM idempotency_keys k
                             WHERE k.account_id = a.id AND k.kind = 'auto_top_up')) AS last_activity
        ) c
        WHERE {OWED_TOP_UP_DUE}
          AND (c.last_activity IS NULL OR c.last_activity < CAST(:now AS timestamptz) - CAST(:slack AS interval))
        """,
    ),
    # owner: the delivery that claimed the key, then the completer; deadline: lease_expires_at
    "processing_keys_within_lease": (
        "no key is processing past its lease (the completer re-sends or ends it)",
        """
        SELECT key, kind, account_id, lease_expires_at, redrives FROM idempotency_keys
        WHERE status = 'processing'
          AND (lease_expires_at IS NULL OR lease_expires_at < CAST(:now AS timestamptz) - CAST(:slack AS interval))
        """,
    ),
    # owner: the committing worker, then every worker's sweeper (which runs on PostgreSQL's clock)
    "outbox_within_deadline": (
        "no outbox row is older than the outbox deadline (every worker's sweeper relays what a dead one left)",
        """
        SELECT message_id, actor_name, created_at FROM outbox
        WHERE created_at < now() - CAST(:outbox_deadline AS interval)
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
        "no top-up attempt is left pending, except one the provider is still processing "
        "(the reconciler settles the others)",
        """
        SELECT id AS attempt_id, account_id, provider_status FROM top_up_attempts
        WHERE status = 'pending' AND provider_status IS DISTINCT FROM 'processing'
        """,
    ),
    "no_unfinished_keys": (
        "every message key is finished: completed, or failed/dead (no key left processing or waiting)",
        """
        SELECT key, kind, status FROM idempotency_keys WHERE status IN ('processing', 'waiting_for_funds')
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


@dataclass(frozen=True)
class AuditDeadlines:
    """How long past its owner's deadline a waiting state may be before the audit flags it.

    Attributes:
      renewal_deadline: An active subscription may be past its period end
        this long before its renewal must have charged it or sent it
        past_due (one hour: the scheduler runs every minute, a top-up is
        reconciled after 10 minutes); a past_due one this long past the
        end of its grace.
      slack: One owner's pass: the completer and the reconciler run in
        every scheduler pass (60 s by default).
      processing_deadline: A top-up the provider still calls processing
        after this long needs an operator (bank debits settle within days;
        Stripe's SEPA debits within 14 days).
      outbox_deadline: Every worker's sweeper relays outbox rows older than
        ``BILLING_OUTBOX_SWEEP_AFTER_MS`` (10 s) every 5 s.
    """

    renewal_deadline: timedelta = timedelta(hours=1)
    slack: timedelta = timedelta(minutes=5)
    processing_deadline: timedelta = timedelta(days=14)
    outbox_deadline: timedelta = timedelta(minutes=5)


async def run_audit(
    engine: AsyncEngine,
    *,
    quiescent: bool = False,
    limit: int = 20,
    now: datetime | None = None,
    deadlines: AuditDeadlines | None = None,
    policy: BillingPolicy | None = None,
) -> AuditReport:
    """Run every check in one REPEATABLE READ snapshot.

    Parameters:
      quiescent: Also run the checks that need drained queues.
      limit: Violations listed per check (at most).
      now: The money path's "now" (UTC) the deadlines are measured from;
        None: PostgreSQL's clock.  A run on an injected clock passes its own.
      deadlines: Tolerances past the owners' deadlines (:class:`AuditDeadlines`).
      policy: The workers' money policy (``BILLING_TOP_UPS_PER_PERIOD``: whether
        an account that owes may still be topped up this month); default
        :class:`~db.money.BillingPolicy`.
    """
    report = AuditReport()
    checks = {**CHECKS, **(QUIESCENT_CHECKS if quiescent else {})}
    d = deadlines or AuditDeadlines()
    params = {
        "renewal_deadline": d.renewal_deadline,
        "slack": d.slack,
        "processing_deadline": d.processing_deadline,
        "outbox_deadline": d.outbox_deadline,
        "top_ups_per_period": (policy or BillingPolicy()).top_ups_per_period,
    }
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            await conn.execute(text("SET TRANSACTION READ ONLY"))
            if now is None:
                now = (await conn.execute(text("SELECT now()"))).scalar_one()
            for name, (description, sql) in checks.items():
                statement = text(f"SELECT * FROM ({sql}) v LIMIT {int(limit)}")
                known = {**params, "now": now, "period": top_up_period(now)}
                used = {k: v for k, v in known.items() if f":{k}" in sql}
                rows = (await conn.execute(statement, used)).mappings().all()
                report.violations[name] = [{k: _plain(v) for k, v in r.items()} for r in rows]
                report.descriptions[name] = description
    return report


def _plain(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value
