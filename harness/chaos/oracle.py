"""The chaos run's three numbers: double charges, lost effects and unpaid entitled periods.

An independent check of the promise (no customer charged twice, no paid-for
effect lost), written as plain SQL over the tables and the fake provider's
charges, apart from the code under test; each query returns one row per
violation.  :func:`count_promise` runs them in one snapshot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

# ============================================================================ the three numbers

#: Double charges: money taken twice for one thing.  Each query returns one row per violation.
DOUBLE_CHARGE_CHECKS: dict[str, str] = {
    # a subscription period charged by more than one ledger row
    "period charged twice": """
        SELECT subscription_id, period_start, count(*) AS charges FROM ledger_entries
        WHERE kind IN ('subscription_charge', 'renewal_charge')
        GROUP BY subscription_id, period_start HAVING count(*) > 1
    """,
    # one provider charge credited by more than one top-up credit (or through more than one attempt)
    "provider charge credited twice": """
        SELECT c.idempotency_key, count(DISTINCT t.id) AS attempts, count(l.id) AS credits
        FROM fake_provider_charges c
        JOIN top_up_attempts t ON t.provider_idempotency_key = c.idempotency_key
        LEFT JOIN ledger_entries l ON l.top_up_attempt_id = t.id AND l.kind = 'top_up'
        WHERE c.status = 'succeeded'
        GROUP BY c.idempotency_key HAVING count(l.id) > 1 OR count(DISTINCT t.id) > 1
    """,
    # usage debited more than once: an account's usage_charge entries and what it owes exceed the
    # usage its events recorded, or one batch entry debits more than its events were charged
    "usage debited twice": """
        SELECT a.id AS account_id, COALESCE(l.charged, 0) AS debited_micros, a.owed_micros,
               COALESCE(u.applied, 0) AS usage_micros
        FROM accounts a
        LEFT JOIN (SELECT account_id, sum(amount_micros)::bigint AS applied FROM usage_events
                   GROUP BY account_id) u ON u.account_id = a.id
        LEFT JOIN (SELECT account_id, (-sum(amount_micros))::bigint AS charged FROM ledger_entries
                   WHERE kind = 'usage_charge' GROUP BY account_id) l ON l.account_id = a.id
        WHERE COALESCE(l.charged, 0) + a.owed_micros > COALESCE(u.applied, 0)
        UNION ALL
        SELECT l.account_id, -l.amount_micros, NULL, sum(u.charged_micros)::bigint FROM ledger_entries l
        LEFT JOIN usage_events u ON u.ledger_entry_id = l.id
        WHERE l.kind = 'usage_charge' AND l.idempotency_key LIKE 'usage:%'
        GROUP BY l.id HAVING -l.amount_micros > COALESCE(sum(u.charged_micros), 0)
    """,
    # one top-up request (message key) that took money more than once at the provider
    "top-up request charged twice at the provider": """
        SELECT t.message_idempotency_key, count(*) AS provider_charges FROM top_up_attempts t
        JOIN fake_provider_charges c ON c.idempotency_key = t.provider_idempotency_key AND c.status = 'succeeded'
        WHERE t.message_idempotency_key IS NOT NULL
        GROUP BY t.message_idempotency_key HAVING count(*) > 1
    """,
}

#: Lost effects: something was asked (and, where it takes money, paid for) and did not happen.
#: ``:published``: the published keys; ``:designed``: the keys designed to fail (poison and doomed messages).
LOST_EFFECT_CHECKS: dict[str, str] = {
    # a published message that never reached the database (it would have a key row: completed or not),
    # except a renewal asked before its time, whose key is forgotten (``not_due``,
    # ``insufficient_funds_before_period_end``): its period must be charged since, or its
    # subscription past_due (the grace rules) or canceled, or the period not begun yet
    "published message never processed": """
        SELECT p.key FROM unnest(:published::text[]) AS p(key)
        LEFT JOIN unnest(:renew_keys::text[], :renew_subs::text[], :renew_periods::timestamptz[])
            AS r(key, subscription_id, period_start) ON r.key = p.key
        WHERE NOT EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.key = p.key)
          AND p.key <> ALL(:designed::text[])
          AND NOT (r.key IS NOT NULL AND EXISTS (
              SELECT 1 FROM subscriptions s WHERE s.id = r.subscription_id
                AND (s.status IN ('past_due', 'canceled')
                     -- not due yet: the paid period before it is still running
                     OR (s.current_period_end = r.period_start AND r.period_start > :now)
                     OR EXISTS (
                        SELECT 1 FROM ledger_entries l
                        WHERE l.subscription_id = s.id AND l.kind IN ('subscription_charge', 'renewal_charge')
                          AND l.period_start = r.period_start))))
    """,
    # a key still processing or waiting for funds: its effect (a subscribe, a renewal, a resumed wait,
    # a top-up) never finished; at the end of a run every owner has passed its deadline
    "key never finished": """
        SELECT key, kind, status FROM idempotency_keys WHERE status IN ('processing', 'waiting_for_funds')
    """,
    # a key that ended failed or dead, whatever failed_messages says, except the messages designed to
    # fail and a renewal whose period was paid anyway (under another key) or whose subscription is canceled
    "message failed": """
        SELECT k.key, k.kind, k.status, k.last_error FROM idempotency_keys k
        WHERE k.status IN ('failed', 'dead') AND k.key <> ALL(:designed::text[])
          AND NOT (k.kind = 'renew' AND EXISTS (
              SELECT 1 FROM subscriptions s
              WHERE s.id = COALESCE(k.request->'kwargs'->>'subscription_id', k.result->>'subscription_id')
                AND (s.status = 'canceled' OR EXISTS (
                    SELECT 1 FROM ledger_entries l
                    WHERE l.subscription_id = s.id AND l.kind IN ('subscription_charge', 'renewal_charge')
                      AND l.period_start = (k.request->'kwargs'->>'period_start')::timestamptz))))
    """,
    # a designed failure that did not fail as designed (a poison message must be dead-lettered
    # as too many deliveries; a doomed one refused as a permanent error), with its record
    "designed failure not recorded": """
        SELECT d.key FROM unnest(:designed::text[]) AS d(key)
        WHERE NOT EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.key = d.key AND k.status IN ('failed', 'dead'))
           OR NOT EXISTS (SELECT 1 FROM failed_messages f WHERE f.idempotency_key = d.key)
    """,
    # an outcome that names an effect the ledger does not have
    "outcome without its charge": """
        SELECT k.key, k.kind, k.result->>'outcome' AS outcome FROM idempotency_keys k
        WHERE k.status = 'completed' AND (
            (k.kind = 'subscribe' AND k.result->>'outcome' = 'subscribed' AND NOT EXISTS (
                SELECT 1 FROM subscriptions s JOIN ledger_entries l
                  ON l.subscription_id = s.id AND l.kind = 'subscription_charge'
                WHERE s.id = k.result->>'subscription_id'))
            OR (k.kind = 'renew' AND k.result->>'outcome' = 'renewed' AND NOT EXISTS (
                SELECT 1 FROM ledger_entries l
                WHERE l.kind = 'renewal_charge' AND l.subscription_id = k.result->>'subscription_id'
                  AND l.period_start = (k.result->>'period_start')::timestamptz))
            OR (k.kind = 'auto_top_up' AND k.result->>'outcome' = 'topped_up' AND NOT EXISTS (
                SELECT 1 FROM top_up_attempts t JOIN ledger_entries l ON l.top_up_attempt_id = t.id
                WHERE t.message_idempotency_key = k.key AND l.kind = 'top_up')))
    """,
    # the customer's card was charged and the balance never credited
    "provider charge never credited": """
        SELECT c.idempotency_key, c.charge_id, c.amount_micros FROM fake_provider_charges c
        WHERE c.status = 'succeeded' AND NOT EXISTS (
            SELECT 1 FROM top_up_attempts t JOIN ledger_entries l ON l.top_up_attempt_id = t.id
            WHERE t.provider_idempotency_key = c.idempotency_key AND l.kind = 'top_up')
    """,
    # a top-up never settled (one the provider still processes is settled by a later look)
    "top-up never settled": """
        SELECT id AS attempt_id, account_id, provider_status FROM top_up_attempts
        WHERE status = 'pending' AND provider_status IS DISTINCT FROM 'processing'
    """,
    # usage that happened and was not billed: a completed usage key without its event, usage the
    # ledger and the owed amount do not cover, or owed usage left uncollected beside a positive balance
    "usage never billed": """
        SELECT k.key, k.account_id, NULL::bigint AS missing_micros FROM idempotency_keys k
        WHERE k.kind = 'record_usage' AND k.status = 'completed'
          AND NOT EXISTS (SELECT 1 FROM usage_events u WHERE u.idempotency_key = k.key)
        UNION ALL
        SELECT NULL, a.id, COALESCE(u.applied, 0) - COALESCE(l.charged, 0) - a.owed_micros FROM accounts a
        LEFT JOIN (SELECT account_id, sum(amount_micros)::bigint AS applied FROM usage_events
                   GROUP BY account_id) u ON u.account_id = a.id
        LEFT JOIN (SELECT account_id, (-sum(amount_micros))::bigint AS charged FROM ledger_entries
                   WHERE kind = 'usage_charge' GROUP BY account_id) l ON l.account_id = a.id
        WHERE COALESCE(l.charged, 0) + a.owed_micros < COALESCE(u.applied, 0)
        UNION ALL
        SELECT NULL, id, owed_micros FROM accounts WHERE owed_micros > 0 AND balance_micros > 0
    """,
    # a message waiting for funds that was never re-run
    "wait never resumed": "SELECT idempotency_key, account_id, actor_name FROM funds_waits",
    # a message written with its effect that never reached Redis
    "outbox row never relayed": "SELECT message_id, actor_name, created_at FROM outbox",
    # paid time taken away: a subscription canceled before the end of the period it paid for
    "paid period cut short": """
        SELECT id AS subscription_id, cancel_reason, canceled_at, current_period_end FROM subscriptions
        WHERE status = 'canceled' AND canceled_at < current_period_end
    """,
}

#: Unpaid entitled periods: service given for time nobody paid for, beyond SPEC's grace rules
#: (past_due is entitled until the end of its grace; canceled is not entitled).  ``:now``: now.
UNPAID_ENTITLED_CHECKS: dict[str, str] = {
    "active past its period end": """
        SELECT id AS subscription_id, account_id, current_period_end FROM subscriptions
        WHERE status = 'active' AND current_period_end <= :now
    """,
    "past_due past its grace": """
        SELECT id AS subscription_id, account_id, grace_ends_at FROM subscriptions
        WHERE status = 'past_due' AND (grace_ends_at IS NULL OR grace_ends_at <= :now)
    """,
    # the period a live subscription is in (or was last paid for, past_due) has no charge
    "current period never charged": """
        SELECT s.id AS subscription_id, s.status, s.current_period_start FROM subscriptions s
        WHERE s.status <> 'canceled' AND NOT EXISTS (
            SELECT 1 FROM ledger_entries l
            WHERE l.subscription_id = s.id AND l.kind IN ('subscription_charge', 'renewal_charge')
              AND l.period_start = s.current_period_start)
    """,
    # what services read (the entitlement projection) grants what the subscription does not
    "entitlement without a paid subscription": """
        SELECT e.account_id, e.plan_id, e.subscription_id, s.status FROM entitlements e
        JOIN subscriptions s ON s.id = e.subscription_id
        WHERE e.entitled AND (s.status = 'canceled'
              OR (s.status = 'active' AND e.current_period_end <= :now)
              OR (s.status = 'past_due' AND (e.grace_ends_at IS NULL OR e.grace_ends_at <= :now)))
    """,
    # a managed API key that still works for a canceled subscription
    "active key of a canceled subscription": """
        SELECT k.id AS key_id, k.subscription_id FROM api_keys k JOIN subscriptions s ON s.id = k.subscription_id
        WHERE k.source = 'managed' AND k.status = 'active' AND s.status = 'canceled'
    """,
}


@dataclass
class PromiseReport:
    """The three numbers of the promise, with the rows behind each (first ``limit`` per check)."""

    double: dict[str, list[dict[str, Any]]]
    lost: dict[str, list[dict[str, Any]]]
    unpaid: dict[str, list[dict[str, Any]]]
    counts: dict[str, int]

    def total(self, group: str) -> int:
        checks = {
            "double": DOUBLE_CHARGE_CHECKS,
            "lost": LOST_EFFECT_CHECKS,
            "unpaid": UNPAID_ENTITLED_CHECKS,
        }
        return sum(self.counts[f"{group}:{name}"] for name in checks[group])

    @property
    def double_charges(self) -> int:
        return self.total("double")

    @property
    def lost_effects(self) -> int:
        return self.total("lost")

    @property
    def unpaid_entitled_periods(self) -> int:
        return self.total("unpaid")

    def breakdown(self, group: str) -> str:
        found = {k.split(":", 1)[1]: n for k, n in self.counts.items() if k.startswith(f"{group}:") and n}
        return ", ".join(f"{k} {n}" for k, n in found.items()) or "none"


async def count_promise(
    conn: asyncpg.Connection,
    *,
    now: datetime,
    published: set[str] | list[str],
    designed_failures: set[str] | list[str],
    renewals: dict[str, tuple[str, datetime]] | None = None,
    limit: int = 20,
) -> PromiseReport:
    """Count double charges, lost effects and unpaid entitled periods, from the database and the provider's table.

    Strict: a ``failed_messages`` row excuses nothing; only the messages
    designed to fail (``designed_failures``) may end failed, and they must.
    ``renewals`` gives the published renewals' (subscription, period start)
    by key, so a renewal asked early, whose key is forgotten, is judged by
    its period.
    Run it once the queues are drained and every owner has passed its
    deadline (:func:`drive_owners`), at the injected clock's ``now``.
    """
    published_l, designed_l = sorted(published), sorted(designed_failures)
    double: dict[str, list[dict[str, Any]]] = {}
    lost: dict[str, list[dict[str, Any]]] = {}
    unpaid: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, int] = {}
    # one snapshot; inside a caller's transaction (the tests' rolled-back corruptions), that one
    tx = None if conn.is_in_transaction() else conn.transaction(isolation="repeatable_read", readonly=True)
    if tx is not None:
        await tx.start()
    try:
        renew = sorted((renewals or {}).items())
        params = {
            "published": published_l,
            "designed": designed_l,
            "renew_keys": [k for k, _ in renew],
            "renew_subs": [sub for _, (sub, _) in renew],
            "renew_periods": [period for _, (_, period) in renew],
            "now": now,
        }
        for group, checks, out in (
            ("double", DOUBLE_CHARGE_CHECKS, double),
            ("lost", LOST_EFFECT_CHECKS, lost),
            ("unpaid", UNPAID_ENTITLED_CHECKS, unpaid),
        ):
            for name, sql in checks.items():
                sql, args = _numbered(sql, params)
                rows = [dict(r) for r in await conn.fetch(sql, *args)]
                counts[f"{group}:{name}"] = len(rows)
                out[name] = [{k: _plain_value(v) for k, v in r.items()} for r in rows[:limit]]
    finally:
        if tx is not None:
            await tx.rollback()
    return PromiseReport(double, lost, unpaid, counts)


def _numbered(sql: str, params: dict[str, Any]) -> tuple[str, list[Any]]:
    """``:name`` placeholders to asyncpg's ``$n``, with the values of the names the query uses."""
    args: list[Any] = []
    for name, value in params.items():
        if f":{name}" in sql:
            args.append(value)
            sql = re.sub(rf"(?<!:):{name}\b", f"${len(args)}", sql)
    return sql, args


def _plain_value(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value
