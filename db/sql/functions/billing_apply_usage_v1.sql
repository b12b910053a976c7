-- Superseded by billing_apply_usage_v2 (migration 0014): kept, expand-only, while workers of the
-- previous release may still call it; a later migration drops it.
-- The usage rule, the one implementation both usage paths run
-- (db.money.record_usage.apply_record_usage, one event, and
-- billing_record_usage_batch_v1, the events of one account that arrived
-- together): debit usage events p_keys (amounts p_amounts, applied in this
-- order) of account p_account_id, whose lock the caller holds and whose keys
-- the caller has decided to apply.  Usage has happened when it is reported,
-- so it is never refused for lack of funds: the balance covers what it can,
-- in event order, as one usage_charge ledger entry (key usage:{first key})
-- with the balance change in one statement, and the rest is owed
-- (accounts.owed_micros), collected first by the account's next credit
-- (post_ledger_entry).  Each event gets its usage_events row (its key,
-- amount, what was charged and what is owed, its ledger entry) and its
-- stored outcome, returned in event order.
CREATE FUNCTION billing_apply_usage_v1(
    p_account_id text, p_keys text[], p_amounts bigint[], p_meters text[], p_quantities bigint[],
    p_occurred_at timestamptz[], p_now timestamptz)
RETURNS TABLE (o_key text, o_result jsonb) LANGUAGE plpgsql AS $$
DECLARE
    v_total bigint;
    v_charged bigint;
    v_entry bigint;
    v_balance bigint;
BEGIN
    SELECT sum(a)::bigint INTO v_total FROM unnest(p_amounts) AS a;
    SELECT LEAST(acc.balance_micros, v_total) INTO v_charged FROM accounts AS acc WHERE acc.id = p_account_id;
    WITH entry AS (
        INSERT INTO ledger_entries (account_id, amount_micros, kind, idempotency_key, created_at)
        SELECT p_account_id, -v_charged, 'usage_charge', 'usage:' || p_keys[1], p_now WHERE v_charged > 0
        RETURNING id
    )
    UPDATE accounts AS acc SET balance_micros = acc.balance_micros - v_charged,
           owed_micros = acc.owed_micros + (v_total - v_charged), updated_at = p_now
        WHERE acc.id = p_account_id
        RETURNING acc.balance_micros, (SELECT id FROM entry) INTO v_balance, v_entry;
    RETURN QUERY
    WITH e AS (
        SELECT u.k, u.amount, u.meter, u.quantity, u.occurred_at, u.n,
               GREATEST(0, LEAST(u.amount, v_charged - ((sum(u.amount) OVER (ORDER BY u.n))::bigint - u.amount)))
                   AS charged
        FROM unnest(p_keys, p_amounts, p_meters, p_quantities, p_occurred_at) WITH ORDINALITY
             AS u(k, amount, meter, quantity, occurred_at, n)
    ), stored AS (
        INSERT INTO usage_events (idempotency_key, account_id, meter, quantity, amount_micros, charged_micros,
                                  owed_micros, ledger_entry_id, occurred_at, recorded_at)
        SELECT e.k, p_account_id, e.meter, e.quantity, e.amount, e.charged, e.amount - e.charged,
               CASE WHEN e.charged > 0 THEN v_entry END, e.occurred_at, p_now
        FROM e
        RETURNING 1
    )
    SELECT e.k, jsonb_build_object(
               'outcome', 'usage_recorded', 'account_id', p_account_id, 'amount_micros', e.amount,
               'charged_micros', e.charged, 'owed_micros', e.amount - e.charged, 'balance_micros', v_balance,
               'ledger_entry_id', CASE WHEN e.charged > 0 THEN v_entry END)
    FROM e ORDER BY e.n;
END
$$;
