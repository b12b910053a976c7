-- Operators' set-up: accounts, plans, credits, auto-top-up settings, cancel at period end.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: insert_account
INSERT INTO accounts (id, currency, balance_micros, auto_top_up_enabled, auto_top_up_threshold_micros,
    auto_top_up_amount_micros, payment_method_ref, auto_top_up_monthly_cap_micros)
VALUES (:id, :currency, 0, :enabled, :threshold, :amount, :payment_method_ref, :monthly_cap)
ON CONFLICT (id) DO NOTHING RETURNING id;

-- name: insert_plan
INSERT INTO plans (id, name, price_micros, currency, interval, interval_count)
VALUES (:id, :name, :price_micros, :currency, :interval, :interval_count)
ON CONFLICT (id) DO NOTHING RETURNING id;

-- name: credit_exists
SELECT account_id, amount_micros FROM ledger_entries WHERE idempotency_key = :key;

-- name: configure_top_up
UPDATE accounts SET
    auto_top_up_enabled = COALESCE(:enabled, auto_top_up_enabled),
    auto_top_up_threshold_micros = COALESCE(:threshold, auto_top_up_threshold_micros),
    auto_top_up_amount_micros = COALESCE(:amount, auto_top_up_amount_micros),
    payment_method_ref = COALESCE(:payment_method_ref, payment_method_ref),
    auto_top_up_monthly_cap_micros = CASE WHEN :clear_cap THEN NULL
        ELSE COALESCE(:monthly_cap, auto_top_up_monthly_cap_micros) END,
    auto_top_up_max_per_period = CASE WHEN :clear_max THEN NULL
        ELSE COALESCE(:max_per_period, auto_top_up_max_per_period) END,
    auto_top_up_consecutive_declines = CASE WHEN :enabled THEN 0 ELSE auto_top_up_consecutive_declines END,
    auto_top_up_disabled_reason = CASE WHEN :enabled THEN NULL
        WHEN :enabled = false THEN 'disabled by an operator' ELSE auto_top_up_disabled_reason END,
    auto_top_up_disabled_at = CASE WHEN :enabled THEN NULL
        WHEN :enabled = false THEN CAST(:now AS timestamptz) ELSE auto_top_up_disabled_at END,
    updated_at = :now
WHERE id = :id
RETURNING id;

-- name: set_cancel_at_period_end
UPDATE subscriptions SET cancel_at_period_end = :cancel, updated_at = :now
WHERE id = :id AND status <> 'canceled'
RETURNING id, status, current_period_end;
