-- The account lock, the ledger with its balance, the entitlement projection, and the owners whose account a message locks.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: lock_account
SELECT id, currency, balance_micros, owed_micros, auto_top_up_enabled, auto_top_up_threshold_micros,
       auto_top_up_amount_micros, payment_method_ref, auto_top_up_monthly_cap_micros,
       auto_top_up_disabled_reason, auto_top_up_max_per_period
FROM accounts WHERE id = :account_id FOR UPDATE;

-- name: post_ledger_entry
-- One statement: the ledger row and the balance change are applied together
-- or not at all; the balance is changed by SQL arithmetic, never written back
-- from a value read into Python.  A credit (a positive amount) first
-- collects the usage the account owes (accounts.owed_micros), as much of it
-- as the new balance covers, as a usage_charge entry under the key
-- owed:{the credit's key}: the one place owed usage is collected, whatever
-- the credit (top-up, operator credit, adjustment).  The caller holds the
-- account's lock, so the owed amount read here is the one the update changes.
WITH owed AS (
    SELECT CASE WHEN CAST(:amount_micros AS bigint) > 0
                THEN LEAST(a.owed_micros, a.balance_micros + CAST(:amount_micros AS bigint)) ELSE 0 END AS collect
    FROM accounts a WHERE a.id = :account_id
), entry AS (
    INSERT INTO ledger_entries (account_id, amount_micros, kind, subscription_id, period_start,
                                top_up_attempt_id, idempotency_key, created_at)
    VALUES (:account_id, :amount_micros, :kind, :subscription_id, :period_start,
            :top_up_attempt_id, :idempotency_key, :now)
    RETURNING account_id, amount_micros
), collected AS (
    INSERT INTO ledger_entries (account_id, amount_micros, kind, idempotency_key, created_at)
    SELECT :account_id, -owed.collect, 'usage_charge', 'owed:' || CAST(:idempotency_key AS text), :now
    FROM owed WHERE owed.collect > 0
    RETURNING amount_micros
)
UPDATE accounts a SET balance_micros = a.balance_micros + entry.amount_micros - owed.collect,
    owed_micros = a.owed_micros - owed.collect, updated_at = :now
FROM entry, owed WHERE a.id = entry.account_id
RETURNING a.balance_micros, owed.collect AS collected_micros;

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
