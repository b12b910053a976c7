-- The charge of a renewal, the one implementation both renewal paths run
-- (db.money.renew.apply_renew and billing_renew_fast_v1): charge period
-- p_index of the subscription, [p_period_start, p_period_end) (the caller's
-- period arithmetic: db.periods.period_bounds, or billing_period_boundary),
-- advance the subscription to it (active again, dunning cleared), and
-- project the entitlement.  The caller holds the account's and the
-- subscription's locks and has decided the period is due and paid for (the
-- balance checked).  The ledger entry and the balance change are one
-- statement; the ledger key renewal:{subscription}:{period start} is
-- unique, so a period is charged once whatever the message's key.
-- Returns the account's new balance (micros).
CREATE FUNCTION billing_renew_charge_v1(
    p_account_id text, p_subscription_id text, p_plan_id text, p_price_micros bigint, p_index integer,
    p_period_start timestamptz, p_period_end timestamptz, p_now timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_balance bigint;
BEGIN
    WITH entry AS (
        INSERT INTO ledger_entries (account_id, amount_micros, kind, subscription_id, period_start,
                                    idempotency_key, created_at)
        VALUES (p_account_id, -p_price_micros, 'renewal_charge', p_subscription_id, p_period_start,
                'renewal:' || p_subscription_id || ':' || billing_iso(p_period_start), p_now)
        RETURNING account_id, amount_micros
    )
    UPDATE accounts AS acc SET balance_micros = acc.balance_micros + entry.amount_micros, updated_at = p_now
        FROM entry WHERE acc.id = entry.account_id
        RETURNING acc.balance_micros INTO v_balance;
    UPDATE subscriptions SET status = 'active', period_index = p_index, current_period_start = p_period_start,
           current_period_end = p_period_end, past_due_since = NULL, grace_ends_at = NULL, dunning_attempts = 0,
           next_retry_at = NULL, updated_at = p_now
        WHERE id = p_subscription_id;
    INSERT INTO entitlements (account_id, plan_id, subscription_id, status, entitled, current_period_end,
                              grace_ends_at, updated_at)
        VALUES (p_account_id, p_plan_id, p_subscription_id, 'active', true, p_period_end, NULL, p_now)
        ON CONFLICT (account_id, plan_id) DO UPDATE SET
            subscription_id = EXCLUDED.subscription_id, status = EXCLUDED.status,
            entitled = EXCLUDED.entitled, current_period_end = EXCLUDED.current_period_end,
            grace_ends_at = EXCLUDED.grace_ends_at, updated_at = EXCLUDED.updated_at;
    RETURN v_balance;
END
$$;
