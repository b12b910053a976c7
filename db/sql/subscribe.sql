-- subscribe: the plan, the live subscription, the new subscription.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: plan
SELECT id, price_micros, currency, interval, interval_count FROM plans WHERE id = :plan_id;

-- name: live_subscription
SELECT id, status FROM subscriptions WHERE account_id = :account_id AND plan_id = :plan_id AND status <> 'canceled';

-- name: insert_subscription
INSERT INTO subscriptions (id, account_id, plan_id, status, billing_anchor, period_index,
    current_period_start, current_period_end, created_by_key, created_at, updated_at)
VALUES (:id, :account_id, :plan_id, 'active', :anchor, 0, :start, :end, :key, :now, :now);
