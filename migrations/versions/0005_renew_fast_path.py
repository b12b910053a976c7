"""The renewal fast path: one server-side function applies a plain renewal in one round trip.

``billing_renew_fast`` does exactly what ``db.money.apply_renew`` plus
``record_effect`` do for the common case (an active subscription, the
period right after the paid one, enough balance, no auto-top-up to
trigger, no cancel at period end, no catch-up), under the same locks in
the same order (idempotency key, account, subscription), and writes the
same rows: the ledger entry and the balance together, the advanced period,
the entitlement projection, the key's stored outcome.  Anything else
returns ``{"fast": "fallback"}`` without writing, and the worker runs the
Python path in its own transaction, which re-checks everything under its
locks.  Each call runs in a subtransaction (the EXCEPTION block): an error,
a deadlock included, rolls back that message alone and falls back, so one
bad message never sinks the others of its batch.

The worker calls it for a batch of messages in one statement (group
commit: one round trip and one WAL flush for the batch); see
``db.money.renew_fast_batch``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

from migrations.sql import execute_all

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = [
    # Python's datetime.isoformat() of a UTC datetime, as stored in outcomes and ledger keys
    r"""
    CREATE FUNCTION billing_iso(ts timestamptz) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS $$
        SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
            || CASE WHEN date_part('microseconds', ts)::bigint % 1000000 <> 0
                    THEN to_char(ts AT TIME ZONE 'UTC', '.US') ELSE '' END
            || '+00:00'
    $$
    """,
    # db.periods.period_bounds: anchor + n intervals, from the anchor every time, in UTC
    r"""
    CREATE FUNCTION billing_period_boundary(anchor timestamptz, unit text, intervals integer)
    RETURNS timestamptz LANGUAGE sql IMMUTABLE STRICT AS $$
        SELECT ((anchor AT TIME ZONE 'UTC') + CASE unit
                    WHEN 'month' THEN make_interval(months => intervals)
                    WHEN 'day' THEN make_interval(days => intervals) END) AT TIME ZONE 'UTC'
    $$
    """,
    r"""
    CREATE FUNCTION billing_renew_fast(p_key text, p_subscription_id text, p_period_start timestamptz,
                                       p_period_start_iso text, p_now timestamptz)
    RETURNS jsonb LANGUAGE plpgsql AS $$
    DECLARE
        v_key record;
        v_acc record;
        v_sub record;
        v_account text;
        v_index integer;
        v_start timestamptz;
        v_end timestamptz;
        v_balance bigint;
        v_result jsonb;
    BEGIN
        SELECT status, result INTO v_key FROM idempotency_keys WHERE key = p_key FOR UPDATE;
        IF NOT FOUND THEN
            RETURN jsonb_build_object('fast', 'fallback', 'why', 'unclaimed');
        END IF;
        IF v_key.status = 'completed' THEN
            RETURN jsonb_build_object('fast', 'duplicate', 'result', v_key.result);
        END IF;
        SELECT account_id INTO v_account FROM subscriptions WHERE id = p_subscription_id;
        IF NOT FOUND THEN
            RETURN jsonb_build_object('fast', 'fallback', 'why', 'unknown_subscription');
        END IF;
        SELECT id, balance_micros, auto_top_up_enabled, auto_top_up_threshold_micros INTO v_acc
            FROM accounts WHERE id = v_account FOR UPDATE;
        SELECT s.id, s.account_id, s.plan_id, s.status, s.billing_anchor, s.period_index,
               s.current_period_end, s.cancel_at_period_end, p.price_micros, p.interval, p.interval_count
            INTO v_sub
            FROM subscriptions s JOIN plans p ON p.id = s.plan_id
            WHERE s.id = p_subscription_id FOR UPDATE OF s;
        IF v_sub.status <> 'active' OR v_sub.cancel_at_period_end OR p_period_start <> v_sub.current_period_end
           OR v_acc.balance_micros < v_sub.price_micros
           OR (v_acc.auto_top_up_enabled AND v_acc.auto_top_up_threshold_micros IS NOT NULL
               AND v_acc.balance_micros - v_sub.price_micros < v_acc.auto_top_up_threshold_micros) THEN
            RETURN jsonb_build_object('fast', 'fallback', 'why', 'not_plain');
        END IF;
        v_index := v_sub.period_index + 1;
        v_start := billing_period_boundary(v_sub.billing_anchor, v_sub.interval, v_sub.interval_count * v_index);
        v_end := billing_period_boundary(v_sub.billing_anchor, v_sub.interval, v_sub.interval_count * (v_index + 1));
        IF v_end <= p_now THEN  -- catch-up: the Python path writes the next period's renew to the outbox
            RETURN jsonb_build_object('fast', 'fallback', 'why', 'catch_up');
        END IF;
        WITH entry AS (
            INSERT INTO ledger_entries (account_id, amount_micros, kind, subscription_id, period_start,
                                        idempotency_key, created_at)
            VALUES (v_acc.id, -v_sub.price_micros, 'renewal_charge', v_sub.id, v_start,
                    'renewal:' || v_sub.id || ':' || billing_iso(v_start), p_now)
            RETURNING account_id, amount_micros
        )
        UPDATE accounts AS acc SET balance_micros = acc.balance_micros + entry.amount_micros, updated_at = p_now
            FROM entry WHERE acc.id = entry.account_id
            RETURNING acc.balance_micros INTO v_balance;
        UPDATE subscriptions SET status = 'active', period_index = v_index, current_period_start = v_start,
               current_period_end = v_end, past_due_since = NULL, grace_ends_at = NULL, dunning_attempts = 0,
               next_retry_at = NULL, updated_at = p_now
            WHERE id = v_sub.id;
        INSERT INTO entitlements (account_id, plan_id, subscription_id, status, entitled, current_period_end,
                                  grace_ends_at, updated_at)
            VALUES (v_acc.id, v_sub.plan_id, v_sub.id, 'active', true, v_end, NULL, p_now)
            ON CONFLICT (account_id, plan_id) DO UPDATE SET
                subscription_id = EXCLUDED.subscription_id, status = EXCLUDED.status,
                entitled = EXCLUDED.entitled, current_period_end = EXCLUDED.current_period_end,
                grace_ends_at = EXCLUDED.grace_ends_at, updated_at = EXCLUDED.updated_at;
        v_result := jsonb_build_object(
            'outcome', 'renewed', 'subscription_id', v_sub.id, 'account_id', v_acc.id,
            'period_start', p_period_start_iso, 'charged_micros', v_sub.price_micros,
            'balance_micros', v_balance, 'current_period_end', billing_iso(v_end));
        UPDATE idempotency_keys SET status = 'completed', result = v_result, last_error = NULL,
               updated_at = p_now, account_id = COALESCE(account_id, v_acc.id), completed_at = p_now
            WHERE key = p_key;
        RETURN jsonb_build_object('fast', 'applied', 'result', v_result);
    EXCEPTION WHEN OTHERS THEN
        -- this message's writes are rolled back (subtransaction); the Python path runs it alone
        RETURN jsonb_build_object('fast', 'fallback', 'why', 'error', 'sqlstate', SQLSTATE, 'error', SQLERRM);
    END
    $$
    """,
]

DOWNGRADE = [
    "DROP FUNCTION billing_renew_fast(text, text, timestamptz, text, timestamptz)",
    "DROP FUNCTION billing_period_boundary(timestamptz, text, integer)",
    "DROP FUNCTION billing_iso(timestamptz)",
]


def upgrade() -> None:
    execute_all(UPGRADE)


def downgrade() -> None:
    execute_all(DOWNGRADE)
