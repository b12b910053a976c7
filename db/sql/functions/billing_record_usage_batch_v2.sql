-- Superseded by billing_record_usage_batch_v3 (migration 0014): kept, expand-only, while workers of
-- the previous release may still call it; a later migration drops it.
-- The usage fast path: the usage events that arrived together, in one round
-- trip, grouped by account.  First every key of the batch is locked, in key
-- order: the order in which a claim statement (claim_keys) locks them, so a
-- batch and another worker's claim of a repeated event never wait on each
-- other in a cycle (v1 locked them account by account, which deadlocked
-- against such claims).  Then for each account (in account order, so
-- concurrent batches lock accounts in one order), in its own subtransaction:
-- lock the account, as the Python path does after the key;
-- events whose key is completed return their stored outcome (a duplicate),
-- the others are applied together by billing_apply_usage_v1 (one ledger
-- entry, one balance update) and their keys completed with their outcomes.
-- An error in one account's events (an unknown account, a lock timeout) rolls
-- back that account's events alone and returns them as fallbacks, which the
-- worker runs one by one on the Python path; the other accounts' events
-- stand.  The keys must have been claimed before (claim_keys).  Each applied
-- event's row carries the account's auto-top-up settings, for the caller's
-- after-charge check (db.money.funds.after_charge) in the same transaction.
CREATE FUNCTION billing_record_usage_batch_v2(
    p_keys text[], p_account_ids text[], p_amounts bigint[], p_meters text[], p_quantities bigint[],
    p_occurred_at timestamptz[], p_now timestamptz)
RETURNS TABLE (o_key text, o_r jsonb) LANGUAGE plpgsql AS $$
DECLARE
    v_account text;
    v_acc record;
    v_out jsonb;
    v_group text[];
    v_keys text[];
    v_amounts bigint[];
    v_meters text[];
    v_quantities bigint[];
    v_occurred timestamptz[];
    v_results jsonb;
BEGIN
    -- every lookup by primary key (= ANY, or one probe per event): a plan cached for
    -- the function's life must never scan idempotency_keys
    PERFORM 1 FROM idempotency_keys AS k WHERE k.key = ANY (p_keys) ORDER BY k.key FOR UPDATE;
    FOR v_account IN SELECT DISTINCT a FROM unnest(p_account_ids) AS a ORDER BY a LOOP
        BEGIN
            v_group := ARRAY(SELECT u.k FROM unnest(p_keys, p_account_ids) AS u(k, a)
                             WHERE u.a = v_account ORDER BY u.k);
            SELECT COALESCE(jsonb_object_agg(g.k, CASE
                       WHEN k.status IS NULL THEN jsonb_build_object('fast', 'fallback', 'why', 'unclaimed')
                       ELSE jsonb_build_object('fast', 'duplicate', 'result', k.result) END), '{}'::jsonb)
                INTO v_out
                FROM unnest(v_group) AS g(k)
                LEFT JOIN LATERAL (SELECT i.status, i.result FROM idempotency_keys AS i WHERE i.key = g.k) AS k ON true
                WHERE k.status IS NULL OR k.status = 'completed';
            SELECT array_agg(u.k ORDER BY u.k), array_agg(u.amount ORDER BY u.k), array_agg(u.meter ORDER BY u.k),
                   array_agg(u.quantity ORDER BY u.k), array_agg(u.occurred_at ORDER BY u.k)
                INTO v_keys, v_amounts, v_meters, v_quantities, v_occurred
                FROM unnest(p_keys, p_account_ids, p_amounts, p_meters, p_quantities, p_occurred_at)
                     AS u(k, a, amount, meter, quantity, occurred_at)
                WHERE u.a = v_account AND EXISTS (
                    SELECT 1 FROM idempotency_keys AS i WHERE i.key = u.k AND i.status <> 'completed');
            IF v_keys IS NOT NULL THEN
                SELECT acc.id, acc.auto_top_up_enabled, acc.auto_top_up_threshold_micros,
                       acc.auto_top_up_max_per_period INTO v_acc
                    FROM accounts AS acc WHERE acc.id = v_account FOR UPDATE;
                IF NOT FOUND THEN
                    SELECT v_out || jsonb_object_agg(k, jsonb_build_object('fast', 'fallback', 'why', 'unknown_account'))
                        INTO v_out FROM unnest(v_keys) AS k;
                ELSE
                    SELECT jsonb_object_agg(a.o_key, a.o_result) INTO v_results
                        FROM billing_apply_usage_v1(v_account, v_keys, v_amounts, v_meters, v_quantities,
                                                    v_occurred, p_now) AS a;
                    UPDATE idempotency_keys AS k SET status = 'completed', result = v_results -> k.key,
                           last_error = NULL, updated_at = p_now, account_id = COALESCE(k.account_id, v_account),
                           completed_at = p_now
                        WHERE k.key = ANY (v_keys);
                    SELECT v_out || jsonb_object_agg(e.key, jsonb_build_object(
                               'fast', 'applied', 'result', e.value,
                               'account', jsonb_build_object(
                                   'id', v_acc.id, 'auto_top_up_enabled', v_acc.auto_top_up_enabled,
                                   'auto_top_up_threshold_micros', v_acc.auto_top_up_threshold_micros,
                                   'auto_top_up_max_per_period', v_acc.auto_top_up_max_per_period)))
                        INTO v_out FROM jsonb_each(v_results) AS e;
                END IF;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            -- this account's writes are rolled back (subtransaction); the Python path runs its events one by one
            SELECT jsonb_object_agg(u.k, jsonb_build_object('fast', 'fallback', 'why', 'error',
                                                            'sqlstate', SQLSTATE, 'error', SQLERRM))
                INTO v_out
                FROM unnest(p_keys, p_account_ids) AS u(k, a) WHERE u.a = v_account;
        END;
        RETURN QUERY SELECT e.key, e.value FROM jsonb_each(v_out) AS e;
    END LOOP;
END
$$;
