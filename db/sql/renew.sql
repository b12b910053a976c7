-- renew: the locked subscription, its advance, dunning and cancel; the fast path's batch.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: lock_subscription
SELECT s.id, s.account_id, s.plan_id, s.status, s.billing_anchor, s.period_index, s.current_period_start,
       s.current_period_end, s.cancel_at_period_end, s.past_due_since, s.grace_ends_at, s.dunning_attempts,
       p.price_micros, p.currency, p.interval, p.interval_count
FROM subscriptions s JOIN plans p ON p.id = s.plan_id
WHERE s.id = :subscription_id FOR UPDATE OF s;

-- name: renew_charge
-- the charge of a renewal, the same function the fast path runs (db/sql/functions/)
SELECT billing_renew_charge_v1(:account_id, :subscription_id, :plan_id, :price_micros, :index,
                               :period_start, :period_end, :now) AS balance_micros;

-- name: mark_past_due
UPDATE subscriptions SET status = 'past_due', past_due_since = :since, grace_ends_at = :grace_ends_at,
    dunning_attempts = :attempts, next_retry_at = :next_retry_at, updated_at = :now
WHERE id = :id;

-- name: cancel_subscription
UPDATE subscriptions SET status = 'canceled', canceled_at = :now, cancel_reason = :reason,
    next_retry_at = NULL, updated_at = :now
WHERE id = :id AND status <> 'canceled';

-- name: renew_fast
SELECT m.key, billing_renew_fast_v1(m.key, m.subscription_id, m.period_start, m.period_start_iso,
                                 CAST(:now AS timestamptz)) AS r
FROM unnest(CAST(:keys AS text[]), CAST(:subscription_ids AS text[]),
            CAST(:period_starts AS timestamptz[]), CAST(:period_start_isos AS text[]))
     AS m(key, subscription_id, period_start, period_start_iso);
