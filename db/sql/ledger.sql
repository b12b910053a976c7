-- The account lock, the ledger with its balance, the entitlement projection, and the owners whose account a message locks.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: lock_account
SELECT id, currency, balance_micros, auto_top_up_enabled, auto_top_up_threshold_micros,
       auto_top_up_amount_micros, payment_method_ref, auto_top_up_monthly_cap_micros,
       auto_top_up_disabled_reason
FROM accounts WHERE id = :account_id FOR UPDATE;

-- name: post_ledger_entry
-- One statement: the ledger row and the balance change are applied together
-- or not at all; the balance is changed by SQL arithmetic, never written back
-- from a value read into Python.
WITH entry AS (
    INSERT INTO ledger_entries (account_id, amount_micros, kind, subscription_id, period_start,
                                top_up_attempt_id, idempotency_key, created_at)
    VALUES (:account_id, :amount_micros, :kind, :subscription_id, :period_start,
            :top_up_attempt_id, :idempotency_key, :now)
    RETURNING account_id, amount_micros
)
UPDATE accounts a SET balance_micros = a.balance_micros + entry.amount_micros, updated_at = :now
FROM entry WHERE a.id = entry.account_id
RETURNING a.balance_micros;

-- name: upsert_entitlement
INSERT INTO entitlements (account_id, plan_id, subscription_id, status, entitled, current_period_end,
    grace_ends_at, updated_at)
VALUES (:account_id, :plan_id, :subscription_id, :status, :entitled, :current_period_end, :grace_ends_at, :now)
ON CONFLICT (account_id, plan_id) DO UPDATE SET
    subscription_id = EXCLUDED.subscription_id, status = EXCLUDED.status, entitled = EXCLUDED.entitled,
    current_period_end = EXCLUDED.current_period_end, grace_ends_at = EXCLUDED.grace_ends_at,
    updated_at = EXCLUDED.updated_at;

-- name: subscription_owner
SELECT account_id FROM subscriptions WHERE id = :subscription_id;

-- name: api_key_owner
SELECT account_id, subscription_id FROM api_keys WHERE id = :key_id;
