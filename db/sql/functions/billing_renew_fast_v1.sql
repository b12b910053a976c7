-- The renewal fast path: a plain renewal (an active subscription, the
-- period right after the paid one, enough balance, no auto-top-up to
-- trigger, no cancel at period end, no catch-up) in one round trip, under
-- the Python path's locks in its order (idempotency key, account,
-- subscription).  It decides nothing the Python path would decide
-- otherwise: anything but the plain case returns {"fast": "fallback"}
-- without writing, and the worker runs db.money.renew.apply_renew in its own
-- transaction.  The charge itself is billing_renew_charge_v1, the one both
-- paths run; then the key's outcome is stored.  Each call runs in a
-- subtransaction (the EXCEPTION block): an error, a deadlock included,
-- rolls back that message alone and falls back.
CREATE FUNCTION billing_renew_fast_v1(p_key text, p_subscription_id text, p_period_start timestamptz,
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
    v_balance := billing_renew_charge_v1(v_acc.id, v_sub.id, v_sub.plan_id, v_sub.price_micros, v_index,
                                         v_start, v_end, p_now);
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
$$;
