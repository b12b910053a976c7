CREATE FUNCTION public.billing_apply_usage_v1(p_account_id text, p_keys text[], p_amounts bigint[], p_meters text[], p_quantities bigint[], p_occurred_at timestamp with time zone[], p_now timestamp with time zone) RETURNS TABLE(o_key text, o_result jsonb)
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION public.billing_apply_usage_v2(p_account_ids text[], p_keys text[], p_amounts bigint[], p_meters text[], p_quantities bigint[], p_occurred_at timestamp with time zone[], p_now timestamp with time zone) RETURNS TABLE(o_key text, o_account_id text, o_result jsonb)
    LANGUAGE sql
    AS $$
    WITH ev AS (
        SELECT u.k, u.a, u.amount, u.meter, u.quantity, u.occurred_at, u.n
        FROM unnest(p_keys, p_account_ids, p_amounts, p_meters, p_quantities, p_occurred_at) WITH ORDINALITY
             AS u(k, a, amount, meter, quantity, occurred_at, n)
    ), per_account AS (
        SELECT ev.a, sum(ev.amount)::bigint AS total, (array_agg(ev.k ORDER BY ev.n))[1] AS first_key
        FROM ev GROUP BY ev.a
    ), debit AS (
        -- a scalar subquery: one probe of the primary key per account, whatever the planner
        -- estimates (a missing account fails the ledger entry's and the event's foreign keys)
        SELECT p.a, p.total, p.first_key,
               LEAST((SELECT acc.balance_micros FROM accounts AS acc WHERE acc.id = p.a), p.total) AS charged
        FROM per_account AS p
    ), entry AS (
        INSERT INTO ledger_entries (account_id, amount_micros, kind, idempotency_key, created_at)
        SELECT d.a, -d.charged, 'usage_charge', 'usage:' || d.first_key, p_now FROM debit AS d WHERE d.charged > 0
        RETURNING id, account_id
    ), balance AS (
        UPDATE accounts AS acc SET balance_micros = acc.balance_micros - d.charged,
               owed_micros = acc.owed_micros + (d.total - d.charged), updated_at = p_now
        FROM debit AS d WHERE acc.id = d.a AND acc.id = ANY (p_account_ids)
        RETURNING acc.id, acc.balance_micros
    ), split AS (
        SELECT ev.k, ev.a, ev.amount, ev.meter, ev.quantity, ev.occurred_at, ev.n,
               GREATEST(0, LEAST(ev.amount, d.charged
                   - ((sum(ev.amount) OVER (PARTITION BY ev.a ORDER BY ev.n))::bigint - ev.amount))) AS charged
        FROM ev JOIN debit AS d ON d.a = ev.a
    ), stored AS (
        INSERT INTO usage_events (idempotency_key, account_id, meter, quantity, amount_micros, charged_micros,
                                  owed_micros, ledger_entry_id, occurred_at, recorded_at)
        SELECT s.k, s.a, s.meter, s.quantity, s.amount, s.charged, s.amount - s.charged,
               CASE WHEN s.charged > 0 THEN e.id END, s.occurred_at, p_now
        FROM split AS s LEFT JOIN entry AS e ON e.account_id = s.a
    )
    SELECT s.k, s.a, jsonb_build_object(
               'outcome', 'usage_recorded', 'account_id', s.a, 'amount_micros', s.amount,
               'charged_micros', s.charged, 'owed_micros', s.amount - s.charged, 'balance_micros', b.balance_micros,
               'ledger_entry_id', CASE WHEN s.charged > 0 THEN e.id END)
    FROM split AS s JOIN balance AS b ON b.id = s.a LEFT JOIN entry AS e ON e.account_id = s.a
    ORDER BY s.n
$$;

CREATE FUNCTION public.billing_has_credits_v1() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO account_entitlements (account_id, has_credits, updated_at)
        VALUES (NEW.id, NEW.balance_micros > 0 AND NEW.owed_micros = 0, NEW.updated_at)
        ON CONFLICT (account_id) DO UPDATE SET has_credits = EXCLUDED.has_credits, updated_at = EXCLUDED.updated_at;
    RETURN NULL;
END
$$;

CREATE FUNCTION public.billing_iso(ts timestamp with time zone) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT
    AS $$
        SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
            || CASE WHEN date_part('microseconds', ts)::bigint % 1000000 <> 0
                    THEN to_char(ts AT TIME ZONE 'UTC', '.US') ELSE '' END
            || '+00:00'
    $$;

CREATE FUNCTION public.billing_period_boundary(anchor timestamp with time zone, unit text, intervals integer) RETURNS timestamp with time zone
    LANGUAGE sql IMMUTABLE STRICT
    AS $$
        SELECT ((anchor AT TIME ZONE 'UTC') + CASE unit
                    WHEN 'month' THEN make_interval(months => intervals)
                    WHEN 'day' THEN make_interval(days => intervals) END) AT TIME ZONE 'UTC'
    $$;

CREATE FUNCTION public.billing_record_usage_batch_v2(p_keys text[], p_account_ids text[], p_amounts bigint[], p_meters text[], p_quantities bigint[], p_occurred_at timestamp with time zone[], p_now timestamp with time zone) RETURNS TABLE(o_key text, o_r jsonb)
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION public.billing_record_usage_batch_v3(p_keys text[], p_account_ids text[], p_amounts bigint[], p_meters text[], p_quantities bigint[], p_occurred_at timestamp with time zone[], p_now timestamp with time zone) RETURNS TABLE(o_key text, o_r jsonb)
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION public.billing_renew_charge_v1(p_account_id text, p_subscription_id text, p_plan_id text, p_price_micros bigint, p_index integer, p_period_start timestamp with time zone, p_period_end timestamp with time zone, p_now timestamp with time zone) RETURNS bigint
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION public.billing_renew_fast_v1(p_key text, p_subscription_id text, p_period_start timestamp with time zone, p_period_start_iso text, p_now timestamp with time zone) RETURNS jsonb
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION public.ledger_entries_append_only() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        RAISE EXCEPTION 'ledger_entries is append-only: % of entry % refused (post an adjustment instead)',
            TG_OP, OLD.id USING ERRCODE = 'insufficient_privilege';
    END
    $$;

CREATE TABLE public.account_entitlements (
    account_id text NOT NULL,
    has_credits boolean NOT NULL,
    updated_at timestamp with time zone NOT NULL
);

CREATE TABLE public.accounts (
    id text NOT NULL,
    currency character(3) NOT NULL,
    balance_micros bigint DEFAULT 0 NOT NULL,
    auto_top_up_enabled boolean DEFAULT false NOT NULL,
    auto_top_up_threshold_micros bigint,
    auto_top_up_amount_micros bigint,
    payment_method_ref text,
    auto_top_up_consecutive_declines integer DEFAULT 0 NOT NULL,
    auto_top_up_disabled_reason text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    auto_top_up_monthly_cap_micros bigint,
    auto_top_up_disabled_at timestamp with time zone,
    owed_micros bigint DEFAULT 0 NOT NULL,
    auto_top_up_max_per_period integer,
    CONSTRAINT accounts_balance_non_negative CHECK ((balance_micros >= 0)),
    CONSTRAINT accounts_currency_check CHECK ((currency ~ '^[A-Z]{3}$'::text)),
    CONSTRAINT accounts_owed_non_negative CHECK ((owed_micros >= 0)),
    CONSTRAINT accounts_top_up_amount_range CHECK (((auto_top_up_amount_micros IS NULL) OR ((auto_top_up_amount_micros >= 1) AND (auto_top_up_amount_micros <= '1000000000000000'::bigint)))),
    CONSTRAINT accounts_top_up_cap_covers_amount CHECK (((auto_top_up_monthly_cap_micros IS NULL) OR (auto_top_up_amount_micros IS NULL) OR (auto_top_up_monthly_cap_micros >= auto_top_up_amount_micros))),
    CONSTRAINT accounts_top_up_configured CHECK (((NOT auto_top_up_enabled) OR ((auto_top_up_amount_micros IS NOT NULL) AND (auto_top_up_threshold_micros IS NOT NULL) AND (payment_method_ref IS NOT NULL)))),
    CONSTRAINT accounts_top_up_max_per_period_range CHECK (((auto_top_up_max_per_period IS NULL) OR ((auto_top_up_max_per_period >= 1) AND (auto_top_up_max_per_period <= 1000)))),
    CONSTRAINT accounts_top_up_monthly_cap_range CHECK (((auto_top_up_monthly_cap_micros IS NULL) OR ((auto_top_up_monthly_cap_micros >= 1) AND (auto_top_up_monthly_cap_micros <= '1000000000000000'::bigint)))),
    CONSTRAINT accounts_top_up_threshold_range CHECK (((auto_top_up_threshold_micros IS NULL) OR ((auto_top_up_threshold_micros >= 0) AND (auto_top_up_threshold_micros <= '1000000000000000'::bigint))))
);

CREATE TABLE public.alembic_version (
    version_num character varying(32) NOT NULL
);

CREATE TABLE public.api_key_deliveries (
    id text NOT NULL,
    key_id text NOT NULL,
    account_id text NOT NULL,
    subscription_id text,
    prefix text NOT NULL,
    reason text NOT NULL,
    replaces_key_id text,
    reissue_idempotency_key text,
    recipient_public_key text NOT NULL,
    sealed_box bytea,
    status text DEFAULT 'pending'::text NOT NULL,
    deliver_by timestamp with time zone NOT NULL,
    created_at timestamp with time zone NOT NULL,
    acknowledged_at timestamp with time zone,
    acknowledged_by text,
    CONSTRAINT api_key_deliveries_acknowledged_at CHECK (((status = 'acknowledged'::text) = (acknowledged_at IS NOT NULL))),
    CONSTRAINT api_key_deliveries_deadline CHECK ((deliver_by >= created_at)),
    CONSTRAINT api_key_deliveries_reason_check CHECK ((reason = ANY (ARRAY['issued'::text, 'reissued'::text]))),
    CONSTRAINT api_key_deliveries_recipient_public_key_check CHECK ((recipient_public_key ~ '^[A-Za-z0-9+/]{43}=$'::text)),
    CONSTRAINT api_key_deliveries_reissue CHECK (((reason = 'reissued'::text) = ((replaces_key_id IS NOT NULL) AND (reissue_idempotency_key IS NOT NULL)))),
    CONSTRAINT api_key_deliveries_sealed_while_pending CHECK (((status = 'pending'::text) = (sealed_box IS NOT NULL))),
    CONSTRAINT api_key_deliveries_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'acknowledged'::text, 'superseded'::text])))
);

CREATE TABLE public.api_key_recipients (
    account_id text NOT NULL,
    public_key text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT api_key_recipients_public_key_check CHECK ((public_key ~ '^[A-Za-z0-9+/]{43}=$'::text))
);

CREATE TABLE public.api_keys (
    id text NOT NULL,
    account_id text NOT NULL,
    subscription_id text,
    source text NOT NULL,
    prefix text NOT NULL,
    key_hash text NOT NULL,
    status text DEFAULT 'active'::text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    revoked_at timestamp with time zone,
    revoke_reason text,
    CONSTRAINT api_keys_managed_has_subscription CHECK (((source = 'user'::text) OR (subscription_id IS NOT NULL))),
    CONSTRAINT api_keys_revoked_at CHECK (((status = 'revoked'::text) = (revoked_at IS NOT NULL))),
    CONSTRAINT api_keys_source_check CHECK ((source = ANY (ARRAY['managed'::text, 'user'::text]))),
    CONSTRAINT api_keys_status_check CHECK ((status = ANY (ARRAY['active'::text, 'revoked'::text])))
);

CREATE TABLE public.entitlements (
    account_id text NOT NULL,
    plan_id text NOT NULL,
    subscription_id text NOT NULL,
    status text NOT NULL,
    entitled boolean NOT NULL,
    current_period_end timestamp with time zone,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    grace_ends_at timestamp with time zone
);

CREATE TABLE public.failed_messages (
    message_id text NOT NULL,
    actor_name text NOT NULL,
    queue_name text NOT NULL,
    kwargs jsonb,
    idempotency_key text,
    account_id text,
    error_type text NOT NULL,
    error_message text NOT NULL,
    traceback text,
    attempts integer DEFAULT 1 NOT NULL,
    status text DEFAULT 'dead'::text NOT NULL,
    first_seen_at timestamp with time zone DEFAULT now() NOT NULL,
    last_seen_at timestamp with time zone DEFAULT now() NOT NULL,
    retry_count integer DEFAULT 0 NOT NULL,
    last_retried_at timestamp with time zone,
    last_retried_by text,
    resolved_at timestamp with time zone,
    resolved_by text,
    resolution text,
    replayed_at timestamp with time zone,
    replayed_by text,
    replay_key text,
    replay_message_id text,
    CONSTRAINT failed_messages_replay_complete CHECK ((((replayed_at IS NULL) = (replay_key IS NULL)) AND ((replayed_at IS NULL) = (replay_message_id IS NULL)) AND ((replayed_at IS NULL) = (replayed_by IS NULL)))),
    CONSTRAINT failed_messages_status_check CHECK ((status = ANY (ARRAY['dead'::text, 'retried'::text, 'resolved'::text])))
);

CREATE TABLE public.fake_provider_charges (
    idempotency_key text NOT NULL,
    charge_id text NOT NULL,
    payment_method_ref text NOT NULL,
    amount_micros bigint NOT NULL,
    currency character(3) NOT NULL,
    status text NOT NULL,
    decline_code text,
    calls integer DEFAULT 1 NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    settles_as text,
    settles_at timestamp with time zone,
    CONSTRAINT fake_provider_charges_settles_as_check CHECK ((settles_as = ANY (ARRAY['succeeded'::text, 'failed'::text]))),
    CONSTRAINT fake_provider_charges_status_check CHECK ((status = ANY (ARRAY['succeeded'::text, 'declined'::text, 'processing'::text, 'failed'::text])))
);

CREATE TABLE public.funds_waits (
    idempotency_key text NOT NULL,
    account_id text NOT NULL,
    actor_name text NOT NULL,
    queue_name text NOT NULL,
    kwargs jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE public.idempotency_keys (
    key text NOT NULL,
    kind text NOT NULL,
    fingerprint text NOT NULL,
    status text NOT NULL,
    result jsonb,
    attempts integer DEFAULT 0 NOT NULL,
    last_error text,
    account_id text,
    message_id text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    completed_at timestamp with time zone,
    lease_expires_at timestamp with time zone,
    request jsonb,
    redrives integer DEFAULT 0 NOT NULL,
    CONSTRAINT idempotency_keys_status_check CHECK ((status = ANY (ARRAY['processing'::text, 'waiting_for_funds'::text, 'completed'::text, 'failed'::text, 'dead'::text])))
);

CREATE TABLE public.ledger_entries (
    id bigint NOT NULL,
    account_id text NOT NULL,
    amount_micros bigint NOT NULL,
    kind text NOT NULL,
    subscription_id text,
    period_start timestamp with time zone,
    top_up_attempt_id text,
    idempotency_key text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT ledger_charge_has_period CHECK (((kind <> ALL (ARRAY['subscription_charge'::text, 'renewal_charge'::text])) OR ((subscription_id IS NOT NULL) AND (period_start IS NOT NULL) AND (amount_micros < 0)))),
    CONSTRAINT ledger_entries_amount_micros_check CHECK (((amount_micros <> 0) AND (abs(amount_micros) <= '1000000000000000'::bigint))),
    CONSTRAINT ledger_entries_kind_check CHECK ((kind = ANY (ARRAY['top_up'::text, 'subscription_charge'::text, 'renewal_charge'::text, 'refund'::text, 'adjustment'::text, 'usage_charge'::text]))),
    CONSTRAINT ledger_top_up_has_attempt CHECK (((kind <> 'top_up'::text) OR ((top_up_attempt_id IS NOT NULL) AND (amount_micros > 0)))),
    CONSTRAINT ledger_usage_is_a_debit CHECK (((kind <> 'usage_charge'::text) OR (amount_micros < 0)))
);

ALTER TABLE public.ledger_entries ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.ledger_entries_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE public.operator_actions (
    id bigint NOT NULL,
    at timestamp with time zone DEFAULT now() NOT NULL,
    operator text NOT NULL,
    via text NOT NULL,
    action text NOT NULL,
    target jsonb DEFAULT '{}'::jsonb NOT NULL,
    count integer DEFAULT 0 NOT NULL,
    details jsonb DEFAULT '{}'::jsonb NOT NULL,
    CONSTRAINT operator_actions_via_check CHECK ((via = ANY (ARRAY['cli'::text, 'dashboard'::text])))
);

ALTER TABLE public.operator_actions ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.operator_actions_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE public.outbox (
    id bigint NOT NULL,
    message_id text NOT NULL,
    queue_name text NOT NULL,
    actor_name text NOT NULL,
    kwargs jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER TABLE public.outbox ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.outbox_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE public.plans (
    id text NOT NULL,
    name text NOT NULL,
    price_micros bigint NOT NULL,
    currency character(3) NOT NULL,
    "interval" text NOT NULL,
    interval_count integer DEFAULT 1 NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT plans_currency_check CHECK ((currency ~ '^[A-Z]{3}$'::text)),
    CONSTRAINT plans_interval_check CHECK (("interval" = ANY (ARRAY['month'::text, 'day'::text]))),
    CONSTRAINT plans_interval_count_check CHECK (((interval_count >= 1) AND (interval_count <= 366))),
    CONSTRAINT plans_price_micros_check CHECK (((price_micros >= 1) AND (price_micros <= '1000000000000000'::bigint)))
);

CREATE UNLOGGED TABLE public.scheduled_renewals (
    subscription_id text NOT NULL,
    period_start timestamp with time zone NOT NULL,
    retry integer NOT NULL,
    enqueued_at timestamp with time zone NOT NULL,
    broker_message_id text,
    CONSTRAINT scheduled_renewals_retry_check CHECK ((retry >= 0))
);

CREATE TABLE public.subscriptions (
    id text NOT NULL,
    account_id text NOT NULL,
    plan_id text NOT NULL,
    status text NOT NULL,
    billing_anchor timestamp with time zone NOT NULL,
    period_index integer DEFAULT 0 NOT NULL,
    current_period_start timestamp with time zone NOT NULL,
    current_period_end timestamp with time zone NOT NULL,
    cancel_at_period_end boolean DEFAULT false NOT NULL,
    canceled_at timestamp with time zone,
    cancel_reason text,
    created_by_key text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    past_due_since timestamp with time zone,
    grace_ends_at timestamp with time zone,
    dunning_attempts integer DEFAULT 0 NOT NULL,
    next_retry_at timestamp with time zone,
    CONSTRAINT subscriptions_canceled_at CHECK (((status = 'canceled'::text) = (canceled_at IS NOT NULL))),
    CONSTRAINT subscriptions_period_order CHECK ((current_period_end > current_period_start)),
    CONSTRAINT subscriptions_status_check CHECK ((status = ANY (ARRAY['active'::text, 'past_due'::text, 'canceled'::text])))
);

CREATE TABLE public.top_up_attempts (
    id text NOT NULL,
    account_id text NOT NULL,
    message_idempotency_key text NOT NULL,
    provider_idempotency_key text NOT NULL,
    amount_micros bigint NOT NULL,
    currency character(3) NOT NULL,
    payment_method_ref text NOT NULL,
    billing_period text NOT NULL,
    status text DEFAULT 'pending'::text NOT NULL,
    recovery_point text DEFAULT 'started'::text NOT NULL,
    provider_charge_id text,
    decline_reason text,
    last_error text,
    reason text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    reconcile_after timestamp with time zone,
    provider_status text,
    charge_lease_until timestamp with time zone,
    reconcile_checks integer DEFAULT 0 NOT NULL,
    CONSTRAINT top_up_attempts_amount_micros_check CHECK (((amount_micros >= 1) AND (amount_micros <= '1000000000000000'::bigint))),
    CONSTRAINT top_up_attempts_recovery_point_check CHECK ((recovery_point = ANY (ARRAY['started'::text, 'finished'::text]))),
    CONSTRAINT top_up_attempts_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'succeeded'::text, 'declined'::text, 'failed'::text])))
);

CREATE TABLE public.usage_events (
    idempotency_key text NOT NULL,
    account_id text NOT NULL,
    meter text,
    quantity bigint,
    amount_micros bigint NOT NULL,
    charged_micros bigint NOT NULL,
    owed_micros bigint NOT NULL,
    ledger_entry_id bigint,
    occurred_at timestamp with time zone,
    recorded_at timestamp with time zone NOT NULL,
    CONSTRAINT usage_events_amount_micros_check CHECK (((amount_micros > 0) AND (amount_micros <= '1000000000000000'::bigint))),
    CONSTRAINT usage_events_charge_has_entry CHECK (((charged_micros > 0) = (ledger_entry_id IS NOT NULL))),
    CONSTRAINT usage_events_charged_micros_check CHECK ((charged_micros >= 0)),
    CONSTRAINT usage_events_owed_micros_check CHECK ((owed_micros >= 0)),
    CONSTRAINT usage_events_quantity_check CHECK ((quantity >= 0)),
    CONSTRAINT usage_events_split CHECK (((charged_micros + owed_micros) = amount_micros))
);

ALTER TABLE ONLY public.account_entitlements
    ADD CONSTRAINT account_entitlements_pkey PRIMARY KEY (account_id);

ALTER TABLE ONLY public.accounts
    ADD CONSTRAINT accounts_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.alembic_version
    ADD CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num);

ALTER TABLE ONLY public.api_key_deliveries
    ADD CONSTRAINT api_key_deliveries_key_id_key UNIQUE (key_id);

ALTER TABLE ONLY public.api_key_deliveries
    ADD CONSTRAINT api_key_deliveries_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.api_key_deliveries
    ADD CONSTRAINT api_key_deliveries_reissue_idempotency_key_key UNIQUE (reissue_idempotency_key);

ALTER TABLE ONLY public.api_key_recipients
    ADD CONSTRAINT api_key_recipients_pkey PRIMARY KEY (account_id);

ALTER TABLE ONLY public.api_keys
    ADD CONSTRAINT api_keys_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.api_keys
    ADD CONSTRAINT api_keys_prefix_key UNIQUE (prefix);

ALTER TABLE ONLY public.entitlements
    ADD CONSTRAINT entitlements_pkey PRIMARY KEY (account_id, plan_id);

ALTER TABLE ONLY public.failed_messages
    ADD CONSTRAINT failed_messages_pkey PRIMARY KEY (message_id);

ALTER TABLE ONLY public.fake_provider_charges
    ADD CONSTRAINT fake_provider_charges_charge_id_key UNIQUE (charge_id);

ALTER TABLE ONLY public.fake_provider_charges
    ADD CONSTRAINT fake_provider_charges_pkey PRIMARY KEY (idempotency_key);

ALTER TABLE ONLY public.funds_waits
    ADD CONSTRAINT funds_waits_pkey PRIMARY KEY (idempotency_key);

ALTER TABLE ONLY public.idempotency_keys
    ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (key);

ALTER TABLE ONLY public.ledger_entries
    ADD CONSTRAINT ledger_entries_idempotency_key_key UNIQUE (idempotency_key);

ALTER TABLE ONLY public.ledger_entries
    ADD CONSTRAINT ledger_entries_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.ledger_entries
    ADD CONSTRAINT ledger_entries_top_up_attempt_id_key UNIQUE (top_up_attempt_id);

ALTER TABLE ONLY public.operator_actions
    ADD CONSTRAINT operator_actions_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.outbox
    ADD CONSTRAINT outbox_message_id_key UNIQUE (message_id);

ALTER TABLE ONLY public.outbox
    ADD CONSTRAINT outbox_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.plans
    ADD CONSTRAINT plans_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.scheduled_renewals
    ADD CONSTRAINT scheduled_renewals_pkey PRIMARY KEY (subscription_id);

ALTER TABLE ONLY public.subscriptions
    ADD CONSTRAINT subscriptions_created_by_key_key UNIQUE (created_by_key);

ALTER TABLE ONLY public.subscriptions
    ADD CONSTRAINT subscriptions_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.top_up_attempts
    ADD CONSTRAINT top_up_attempts_message_idempotency_key_key UNIQUE (message_idempotency_key);

ALTER TABLE ONLY public.top_up_attempts
    ADD CONSTRAINT top_up_attempts_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.top_up_attempts
    ADD CONSTRAINT top_up_attempts_provider_charge_id_key UNIQUE (provider_charge_id);

ALTER TABLE ONLY public.top_up_attempts
    ADD CONSTRAINT top_up_attempts_provider_idempotency_key_key UNIQUE (provider_idempotency_key);

ALTER TABLE ONLY public.usage_events
    ADD CONSTRAINT usage_events_pkey PRIMARY KEY (idempotency_key);

CREATE INDEX accounts_owing ON public.accounts USING btree (id) WHERE (owed_micros > 0);

CREATE INDEX api_key_deliveries_account ON public.api_key_deliveries USING btree (account_id);

CREATE INDEX api_key_deliveries_deadline ON public.api_key_deliveries USING btree (deliver_by) WHERE (status = 'pending'::text);

CREATE INDEX api_key_deliveries_pending ON public.api_key_deliveries USING btree (recipient_public_key, created_at) WHERE (status = 'pending'::text);

CREATE INDEX api_keys_account ON public.api_keys USING btree (account_id);

CREATE INDEX api_keys_subscription ON public.api_keys USING btree (subscription_id) WHERE (subscription_id IS NOT NULL);

CREATE INDEX failed_messages_account ON public.failed_messages USING btree (account_id, last_seen_at DESC);

CREATE INDEX failed_messages_actor ON public.failed_messages USING btree (actor_name, last_seen_at DESC);

CREATE INDEX failed_messages_key ON public.failed_messages USING btree (idempotency_key);

CREATE INDEX failed_messages_last_seen ON public.failed_messages USING btree (last_seen_at DESC);

CREATE INDEX funds_waits_account ON public.funds_waits USING btree (account_id);

CREATE INDEX idempotency_keys_account ON public.idempotency_keys USING btree (account_id);

CREATE INDEX idempotency_keys_unfinished ON public.idempotency_keys USING btree (lease_expires_at) WHERE (status = ANY (ARRAY['processing'::text, 'waiting_for_funds'::text]));

CREATE INDEX ledger_entries_account ON public.ledger_entries USING btree (account_id, id);

CREATE UNIQUE INDEX ledger_one_charge_per_period ON public.ledger_entries USING btree (subscription_id, period_start) WHERE (kind = ANY (ARRAY['subscription_charge'::text, 'renewal_charge'::text]));

CREATE INDEX operator_actions_at ON public.operator_actions USING btree (at DESC);

CREATE INDEX subscriptions_due ON public.subscriptions USING btree (current_period_end) WHERE (status = ANY (ARRAY['active'::text, 'past_due'::text]));

CREATE INDEX subscriptions_dunning_due ON public.subscriptions USING btree (next_retry_at) WHERE (status = 'past_due'::text);

CREATE UNIQUE INDEX subscriptions_one_live_per_account_plan ON public.subscriptions USING btree (account_id, plan_id) WHERE (status <> 'canceled'::text);

CREATE INDEX subscriptions_renewal_due ON public.subscriptions USING btree (current_period_end) WHERE (status = 'active'::text);

CREATE INDEX top_up_attempts_account_period ON public.top_up_attempts USING btree (account_id, billing_period);

CREATE INDEX top_up_attempts_pending ON public.top_up_attempts USING btree (reconcile_after) WHERE (status = 'pending'::text);

CREATE INDEX usage_events_account ON public.usage_events USING btree (account_id, recorded_at);

CREATE INDEX usage_events_ledger_entry ON public.usage_events USING btree (ledger_entry_id) WHERE (ledger_entry_id IS NOT NULL);

CREATE TRIGGER accounts_has_credits_on_insert AFTER INSERT ON public.accounts FOR EACH ROW EXECUTE FUNCTION public.billing_has_credits_v1();

CREATE TRIGGER accounts_has_credits_on_update AFTER UPDATE OF balance_micros, owed_micros ON public.accounts FOR EACH ROW WHEN ((((old.balance_micros > 0) AND (old.owed_micros = 0)) IS DISTINCT FROM ((new.balance_micros > 0) AND (new.owed_micros = 0)))) EXECUTE FUNCTION public.billing_has_credits_v1();

CREATE TRIGGER ledger_entries_append_only BEFORE DELETE OR UPDATE ON public.ledger_entries FOR EACH ROW EXECUTE FUNCTION public.ledger_entries_append_only();

ALTER TABLE ONLY public.account_entitlements
    ADD CONSTRAINT account_entitlements_account_id_fkey FOREIGN KEY (account_id) REFERENCES public.accounts(id);

ALTER TABLE ONLY public.api_key_deliveries
    ADD CONSTRAINT api_key_deliveries_account_id_fkey FOREIGN KEY (account_id) REFERENCES public.accounts(id);

ALTER TABLE ONLY public.api_key_deliveries
    ADD CONSTRAINT api_key_deliveries_key_id_fkey FOREIGN KEY (key_id) REFERENCES public.api_keys(id);

ALTER TABLE ONLY public.api_key_deliveries
    ADD CONSTRAINT api_key_deliveries_replaces_key_id_fkey FOREIGN KEY (replaces_key_id) REFERENCES public.api_keys(id);

ALTER TABLE ONLY public.api_key_deliveries
    ADD CONSTRAINT api_key_deliveries_subscription_id_fkey FOREIGN KEY (subscription_id) REFERENCES public.subscriptions(id);

ALTER TABLE ONLY public.api_key_recipients
    ADD CONSTRAINT api_key_recipients_account_id_fkey FOREIGN KEY (account_id) REFERENCES public.accounts(id);

ALTER TABLE ONLY public.api_keys
    ADD CONSTRAINT api_keys_account_id_fkey FOREIGN KEY (account_id) REFERENCES public.accounts(id);

ALTER TABLE ONLY public.api_keys
    ADD CONSTRAINT api_keys_subscription_id_fkey FOREIGN KEY (subscription_id) REFERENCES public.subscriptions(id);

ALTER TABLE ONLY public.entitlements
    ADD CONSTRAINT entitlements_account_id_fkey FOREIGN KEY (account_id) REFERENCES public.accounts(id);

ALTER TABLE ONLY public.entitlements
    ADD CONSTRAINT entitlements_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES public.plans(id);

ALTER TABLE ONLY public.entitlements
    ADD CONSTRAINT entitlements_subscription_id_fkey FOREIGN KEY (subscription_id) REFERENCES public.subscriptions(id);

ALTER TABLE ONLY public.funds_waits
    ADD CONSTRAINT funds_waits_account_id_fkey FOREIGN KEY (account_id) REFERENCES public.accounts(id);

ALTER TABLE ONLY public.ledger_entries
    ADD CONSTRAINT ledger_entries_account_id_fkey FOREIGN KEY (account_id) REFERENCES public.accounts(id);

ALTER TABLE ONLY public.ledger_entries
    ADD CONSTRAINT ledger_entries_subscription_id_fkey FOREIGN KEY (subscription_id) REFERENCES public.subscriptions(id);

ALTER TABLE ONLY public.ledger_entries
    ADD CONSTRAINT ledger_entries_top_up_attempt_id_fkey FOREIGN KEY (top_up_attempt_id) REFERENCES public.top_up_attempts(id);

ALTER TABLE ONLY public.subscriptions
    ADD CONSTRAINT subscriptions_account_id_fkey FOREIGN KEY (account_id) REFERENCES public.accounts(id);

ALTER TABLE ONLY public.subscriptions
    ADD CONSTRAINT subscriptions_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES public.plans(id);

ALTER TABLE ONLY public.top_up_attempts
    ADD CONSTRAINT top_up_attempts_account_id_fkey FOREIGN KEY (account_id) REFERENCES public.accounts(id);

ALTER TABLE ONLY public.usage_events
    ADD CONSTRAINT usage_events_account_id_fkey FOREIGN KEY (account_id) REFERENCES public.accounts(id);

ALTER TABLE ONLY public.usage_events
    ADD CONSTRAINT usage_events_ledger_entry_id_fkey FOREIGN KEY (ledger_entry_id) REFERENCES public.ledger_entries(id);
