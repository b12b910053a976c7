-- The usage fast path: the usage events that arrived together, in one round
-- trip, applied in a fixed number of statements whatever the number of
-- accounts.  First every key of the batch is locked, in key order: the order
-- in which a claim statement (claim_keys) locks them, so a batch and another
-- worker's claim of a repeated event never wait on each other in a cycle.
-- Events whose key is completed return their stored outcome (a duplicate);
-- unclaimed ones fall back.  Then, in one subtransaction: the accounts of the
-- others are locked in id order (concurrent batches lock accounts in one
-- order, after their keys, as the Python path does); the events of unknown
-- accounts fall back; billing_apply_usage_v2 applies every other account's
-- events at once (per account one ledger entry and one balance update, its
-- events in key order); and their keys are completed with their outcomes.
-- An error there rolls back the subtransaction and returns those events as
-- fallbacks, which the worker runs one by one on the Python path, where an
-- event that fails does so alone.  Version 2 ran a subtransaction per
-- account, about 0.9 ms of PostgreSQL each, and past 64 of them a
-- transaction's subtransactions overflow the per-backend cache, which slows
-- every snapshot on the server.  The keys must have been claimed before
-- (claim_keys).  Each applied event's row carries the account's auto-top-up
-- settings, for the caller's after-charge check (db.money.funds.after_charge)
-- in the same transaction.
CREATE FUNCTION billing_record_usage_batch_v3(
    p_keys text[], p_account_ids text[], p_amounts bigint[], p_meters text[], p_quantities bigint[],
    p_occurred_at timestamptz[], p_now timestamptz)
RETURNS TABLE (o_key text, o_r jsonb) LANGUAGE plpgsql AS $$
DECLARE
    v_out jsonb;
    v_accounts_found jsonb;
    v_keys text[];
    v_accounts text[];
    v_amounts bigint[];
    v_meters text[];
    v_quantities bigint[];
    v_occurred timestamptz[];
    v_results jsonb;
BEGIN
    -- every lookup by primary key (= ANY, or one probe per event: OFFSET 0 keeps the
    -- subquery from becoming a join): a plan cached for the function's life must
    -- never scan idempotency_keys or accounts
    PERFORM 1 FROM idempotency_keys AS k WHERE k.key = ANY (p_keys) ORDER BY k.key FOR UPDATE;
    SELECT COALESCE(jsonb_object_agg(u.k, CASE
               WHEN i.status IS NULL THEN jsonb_build_object('fast', 'fallback', 'why', 'unclaimed')
               ELSE jsonb_build_object('fast', 'duplicate', 'result', i.result) END), '{}'::jsonb)
        INTO v_out
        FROM unnest(p_keys) AS u(k)
        LEFT JOIN LATERAL (SELECT k.status, k.result FROM idempotency_keys AS k WHERE k.key = u.k OFFSET 0) AS i
             ON true
        WHERE i.status IS NULL OR i.status = 'completed';
    SELECT array_agg(u.k ORDER BY u.a, u.k), array_agg(u.a ORDER BY u.a, u.k), array_agg(u.amount ORDER BY u.a, u.k),
           array_agg(u.meter ORDER BY u.a, u.k), array_agg(u.quantity ORDER BY u.a, u.k),
           array_agg(u.occurred_at ORDER BY u.a, u.k)
        INTO v_keys, v_accounts, v_amounts, v_meters, v_quantities, v_occurred
        FROM unnest(p_keys, p_account_ids, p_amounts, p_meters, p_quantities, p_occurred_at)
             AS u(k, a, amount, meter, quantity, occurred_at)
        WHERE NOT v_out ? u.k;
    IF v_keys IS NULL THEN
        RETURN QUERY SELECT e.key, e.value FROM jsonb_each(v_out) AS e;
        RETURN;
    END IF;
    BEGIN
        SELECT COALESCE(jsonb_object_agg(acc.id, jsonb_build_object(
                   'id', acc.id, 'auto_top_up_enabled', acc.auto_top_up_enabled,
                   'auto_top_up_threshold_micros', acc.auto_top_up_threshold_micros,
                   'auto_top_up_max_per_period', acc.auto_top_up_max_per_period)), '{}'::jsonb)
            INTO v_accounts_found
            FROM (SELECT a.id, a.auto_top_up_enabled, a.auto_top_up_threshold_micros, a.auto_top_up_max_per_period
                  FROM accounts AS a WHERE a.id = ANY (v_accounts) ORDER BY a.id FOR UPDATE) AS acc;
        SELECT v_out || COALESCE(jsonb_object_agg(u.k, jsonb_build_object('fast', 'fallback', 'why', 'unknown_account')),
                                 '{}'::jsonb)
            INTO v_out
            FROM unnest(v_keys, v_accounts) AS u(k, a) WHERE NOT v_accounts_found ? u.a;
        SELECT array_agg(u.k ORDER BY u.n), array_agg(u.a ORDER BY u.n), array_agg(u.amount ORDER BY u.n),
               array_agg(u.meter ORDER BY u.n), array_agg(u.quantity ORDER BY u.n),
               array_agg(u.occurred_at ORDER BY u.n)
            INTO v_keys, v_accounts, v_amounts, v_meters, v_quantities, v_occurred
            FROM unnest(v_keys, v_accounts, v_amounts, v_meters, v_quantities, v_occurred) WITH ORDINALITY
                 AS u(k, a, amount, meter, quantity, occurred_at, n)
            WHERE v_accounts_found ? u.a;
        IF v_keys IS NOT NULL THEN
            SELECT jsonb_object_agg(a.o_key, a.o_result) INTO v_results
                FROM billing_apply_usage_v2(v_accounts, v_keys, v_amounts, v_meters, v_quantities, v_occurred,
                                            p_now) AS a;
            UPDATE idempotency_keys AS k SET status = 'completed', result = v_results -> k.key,
                   last_error = NULL, updated_at = p_now,
                   account_id = COALESCE(k.account_id, v_results -> k.key ->> 'account_id'), completed_at = p_now
                WHERE k.key = ANY (v_keys);
            SELECT v_out || jsonb_object_agg(u.k, jsonb_build_object(
                       'fast', 'applied', 'result', v_results -> u.k, 'account', v_accounts_found -> u.a))
                INTO v_out
                FROM unnest(v_keys, v_accounts) AS u(k, a);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        -- rolled back (subtransaction); the Python path runs these events one by one
        SELECT v_out || jsonb_object_agg(u.k, jsonb_build_object('fast', 'fallback', 'why', 'error',
                                                                 'sqlstate', SQLSTATE, 'error', SQLERRM))
            INTO v_out
            FROM unnest(v_keys) AS u(k);
    END;
    RETURN QUERY SELECT e.key, e.value FROM jsonb_each(v_out) AS e;
END
$$;
