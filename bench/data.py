"""The bench's accounts, plans and subscriptions, created in bulk with SQL (one statement per table).

Each account looks as if it had been opened and subscribed through the money
path (``db.money.create_account`` then ``apply_subscribe``), so ``billing
audit`` passes on the bench database before and after every measurement:

* ``accounts``: ``bacct-{i}``, USD, auto-top-up configured (threshold
  :data:`TOP_UP_THRESHOLD_MICROS`, far below the balance, so renewals never
  trigger one; the mixed workload's ``auto_top_up`` messages can charge the
  fake provider's card ``pm_card_visa``);
* ``account_entitlements``: ``has_credits`` true (a balance, nothing owed);
* ``ledger_entries``: the opening ``adjustment`` (``account-opening:{account}``)
  and the first period's ``subscription_charge``, so balance == sum(ledger);
* ``subscriptions``: ``bsub-{i}`` on the daily plan :data:`RENEW_PLAN`, period
  0 ending at ``due_at`` (due: the scheduler enqueues it, and its ``renew``
  charges period 1, which ends a day later, so no catch-up follows);
* the subscribe's completed ``idempotency_keys`` row (outcome ``subscribed``),
  its managed ``api_keys`` row and its ``entitlements`` projection.

Plans: :data:`RENEW_PLAN`, and per round one ``bench-mix-{r}`` and one
``bench-naive-mix-{r}``, which the mixed workload's ``subscribe`` messages
take in the project's setup and in the naive mixed peer's (an account has
no live subscription to it yet, whichever setup of the round ran first).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import asyncpg

from db.config import plain_url

from .renewal_script import SUBSCRIPTION_PREFIX

__all__ = [
    "ACCOUNT_PREFIX",
    "SUBSCRIPTION_PREFIX",
    "RENEW_PLAN",
    "PRICE_MICROS",
    "OPENING_BALANCE_MICROS",
    "mix_plan",
    "naive_mix_plan",
    "create_bench_data",
    "add_plan",
    "account_id",
    "subscription_id",
]

USD = 1_000_000
ACCOUNT_PREFIX = "bacct-"
#: The plan every bench subscription is on: daily, so a renewal never falls behind ``now`` (no catch-up).
RENEW_PLAN = "bench-daily"
PRICE_MICROS = 1 * USD
#: A million dollars: enough for every renewal of every round (a renewal costs one).
OPENING_BALANCE_MICROS = 1_000_000 * USD
TOP_UP_THRESHOLD_MICROS = 1 * USD
TOP_UP_AMOUNT_MICROS = 10 * USD


def account_id(i: int) -> str:
    """Id of bench account ``i``."""
    return f"{ACCOUNT_PREFIX}{i}"


def subscription_id(i: int) -> str:
    """Id of bench subscription ``i`` (account ``i``'s, on :data:`RENEW_PLAN`)."""
    return f"{SUBSCRIPTION_PREFIX}{i}"


def mix_plan(round_no: int) -> str:
    """The plan the mixed workload of round ``round_no`` subscribes accounts to."""
    return f"bench-mix-{round_no}"


def naive_mix_plan(round_no: int) -> str:
    """The plan the naive mixed peer of round ``round_no`` subscribes accounts to (priced as :func:`mix_plan`)."""
    return f"bench-naive-mix-{round_no}"


_PLANS = """
INSERT INTO plans (id, name, price_micros, currency, interval, interval_count)
SELECT p.id, p.id, $1, 'USD', 'day', 1 FROM unnest($2::text[]) AS p(id)
"""

# (table, statement, its parameters in $1.. order); values by name in create_bench_data:
# n (accounts), opening (balance), price, anchor (start of period 0), at (created at, = period 0's end)
_TABLES: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "accounts",
        f"""
        INSERT INTO accounts (id, currency, balance_micros, auto_top_up_enabled, auto_top_up_threshold_micros,
            auto_top_up_amount_micros, payment_method_ref, created_at, updated_at)
        SELECT '{ACCOUNT_PREFIX}' || i, 'USD', $2::bigint - $3::bigint, true, {TOP_UP_THRESHOLD_MICROS},
            {TOP_UP_AMOUNT_MICROS}, 'pm_card_visa', $4::timestamptz, $4::timestamptz
        FROM generate_series(0, $1::int - 1) AS i
        """,
        ("n", "opening", "price", "anchor"),
    ),
    (
        # what the accounts trigger writes (skipped with the other triggers below): a balance, nothing owed
        "account_entitlements",
        f"""
        INSERT INTO account_entitlements (account_id, has_credits, updated_at)
        SELECT '{ACCOUNT_PREFIX}' || i, true, $2::timestamptz FROM generate_series(0, $1::int - 1) AS i
        """,
        ("n", "anchor"),
    ),
    (
        "subscriptions",
        f"""
        INSERT INTO subscriptions (id, account_id, plan_id, status, billing_anchor, period_index,
            current_period_start, current_period_end, created_by_key, created_at, updated_at)
        SELECT '{SUBSCRIPTION_PREFIX}' || i, '{ACCOUNT_PREFIX}' || i, '{RENEW_PLAN}', 'active', $2::timestamptz, 0,
            $2, $3::timestamptz, 'bench-signup:' || i, $2, $2
        FROM generate_series(0, $1::int - 1) AS i
        """,
        ("n", "anchor", "at"),
    ),
    (
        "ledger_entries",
        f"""
        INSERT INTO ledger_entries (account_id, amount_micros, kind, subscription_id, period_start,
            idempotency_key, created_at)
        SELECT '{ACCOUNT_PREFIX}' || i, $2::bigint, 'adjustment', NULL, NULL::timestamptz,
            'account-opening:{ACCOUNT_PREFIX}' || i, $4::timestamptz
        FROM generate_series(0, $1::int - 1) AS i
        UNION ALL
        SELECT '{ACCOUNT_PREFIX}' || i, -$3::bigint, 'subscription_charge', '{SUBSCRIPTION_PREFIX}' || i,
            $4::timestamptz, 'subscribe:bench-signup:' || i, $4::timestamptz
        FROM generate_series(0, $1::int - 1) AS i
        """,
        ("n", "opening", "price", "anchor"),
    ),
    (
        "idempotency_keys",
        f"""
        INSERT INTO idempotency_keys (key, kind, fingerprint, status, result, attempts, account_id,
            created_at, updated_at, completed_at)
        SELECT 'bench-signup:' || i, 'subscribe', md5('bench-signup:' || i), 'completed',
            jsonb_build_object('outcome', 'subscribed', 'subscription_id', '{SUBSCRIPTION_PREFIX}' || i,
                'key_id', 'bkey-' || i, 'charged_micros', $3::bigint, 'balance_micros', $2::bigint - $3::bigint,
                'current_period_end', $5::timestamptz),
            1, '{ACCOUNT_PREFIX}' || i, $4::timestamptz, $4::timestamptz, $4::timestamptz
        FROM generate_series(0, $1::int - 1) AS i
        """,
        ("n", "opening", "price", "anchor", "at"),
    ),
    (
        "api_keys",
        f"""
        INSERT INTO api_keys (id, account_id, subscription_id, source, prefix, key_hash, status, created_at)
        SELECT 'bkey-' || i, '{ACCOUNT_PREFIX}' || i, '{SUBSCRIPTION_PREFIX}' || i, 'managed', 'bq_bench' || i,
            md5('bench-key:' || i), 'active', $2::timestamptz
        FROM generate_series(0, $1::int - 1) AS i
        """,
        ("n", "anchor"),
    ),
    (
        "entitlements",
        f"""
        INSERT INTO entitlements (account_id, plan_id, subscription_id, status, entitled, current_period_end,
            updated_at)
        SELECT '{ACCOUNT_PREFIX}' || i, '{RENEW_PLAN}', '{SUBSCRIPTION_PREFIX}' || i, 'active', true, $2::timestamptz,
            $3::timestamptz
        FROM generate_series(0, $1::int - 1) AS i
        """,
        ("n", "at", "anchor"),
    ),
]


async def add_plan(url: str, plan_id: str) -> None:
    """Add a plan priced as the bench's others (:data:`PRICE_MICROS` a day) to the bench database at ``url``."""
    conn = await asyncpg.connect(plain_url(url), server_settings={"application_name": "billing-bench-load"})
    try:
        await conn.execute(_PLANS, PRICE_MICROS, [plan_id])
    finally:
        await conn.close()


async def create_bench_data(url: str, accounts: int, *, rounds: int, due_at: datetime) -> dict[str, float]:
    """Create ``accounts`` accounts, each with a subscription due at ``due_at``, and the bench's plans.

    Then ``VACUUM ANALYZE``, so the first measurement neither plans on empty
    statistics nor sets the new rows' hint bits.

    Parameters:
      url: The (migrated, empty) bench database.
      rounds: Rounds of the run (two mixed-workload plans each: the project's, the naive peer's).
      due_at: End of every subscription's current period (UTC, in the past: due).

    Returns:
      Seconds per table, and ``vacuum``.
    """
    anchor = due_at - timedelta(days=1)
    values = {
        "n": accounts,
        "opening": OPENING_BALANCE_MICROS,
        "price": PRICE_MICROS,
        "anchor": anchor,
        "at": due_at,
    }
    seconds: dict[str, float] = {}
    conn = await asyncpg.connect(plain_url(url), server_settings={"application_name": "billing-bench-load"})
    try:
        try:
            # the rows are consistent by construction: skip the per-row foreign-key triggers
            # (a superuser's privilege; the embedded server's and a test server's postgres user have it)
            await conn.execute("SET session_replication_role = replica")
        except asyncpg.InsufficientPrivilegeError:
            pass
        await conn.execute(
            _PLANS,
            PRICE_MICROS,
            [RENEW_PLAN, *(p(r) for r in range(1, rounds + 1) for p in (mix_plan, naive_mix_plan))],
        )
        for table, sql, params in _TABLES:
            started = time.monotonic()
            await conn.execute(sql, *(values[p] for p in params))
            seconds[table] = time.monotonic() - started
        await conn.execute("RESET session_replication_role")
        started = time.monotonic()
        await conn.execute("VACUUM ANALYZE")
        seconds["vacuum"] = time.monotonic() - started
    finally:
        await conn.close()
    return seconds
