-- auto_top_up: the triggers and waits of the charges that need funds, the attempt's phases, the charge lease.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: period_top_ups
SELECT count(*) AS attempts, count(*) FILTER (WHERE status = 'pending') AS pending,
       COALESCE(sum(amount_micros) FILTER (WHERE status IN ('pending', 'succeeded')), 0)::bigint AS committed_micros
FROM top_up_attempts WHERE account_id = :account_id AND billing_period = :period;

-- name: top_up_processing
-- a top-up the provider is processing (a bank debit), any period: nothing waits on
-- it, no other is sent meanwhile, and it holds the end of grace open
SELECT id FROM top_up_attempts
WHERE account_id = :account_id AND status = 'pending' AND provider_status = 'processing' LIMIT 1;

-- name: register_wait
INSERT INTO funds_waits (idempotency_key, account_id, actor_name, queue_name, kwargs)
VALUES (:key, :account_id, :actor_name, :queue_name, :kwargs)
ON CONFLICT (idempotency_key) DO NOTHING;

-- name: resume_waits
-- The waits end and their keys go back to ``processing`` in one statement:
-- the re-sent message (and only it, or a re-send that arrives after it) runs
-- the effect; until then a re-send of a waiting key is a no-op.  The resume
-- starts the key's delivery count afresh: a message that waited on several
-- top-ups in turn (BILLING_TOP_UPS_PER_PERIOD > 1, each declined) was dying
-- of its own resumes; a poison message is still bounded, per resume.
WITH w AS (
    DELETE FROM funds_waits WHERE account_id = :account_id
    RETURNING idempotency_key, actor_name, queue_name, kwargs
), k AS (
    UPDATE idempotency_keys k SET status = 'processing', lease_expires_at = :lease_expires_at, attempts = 0,
        request = jsonb_build_object('actor_name', w.actor_name, 'queue_name', w.queue_name, 'kwargs', w.kwargs),
        updated_at = :now
    FROM w WHERE k.key = w.idempotency_key AND k.status = 'waiting_for_funds'
)
SELECT idempotency_key, actor_name, queue_name, kwargs FROM w ORDER BY idempotency_key;

-- name: attempt_of_message
SELECT id, account_id, provider_idempotency_key, amount_micros, currency, payment_method_ref, status,
       recovery_point
FROM top_up_attempts WHERE message_idempotency_key = :key;

-- name: insert_attempt
INSERT INTO top_up_attempts (id, account_id, message_idempotency_key, provider_idempotency_key, amount_micros,
    currency, payment_method_ref, billing_period, status, recovery_point, reason, created_at, updated_at,
    reconcile_after)
VALUES (:id, :account_id, :key, :provider_key, :amount_micros, :currency, :payment_method_ref, :period,
    'pending', 'started', :reason, :now, :now, :reconcile_after);

-- name: lock_attempt
SELECT id, status, provider_charge_id, amount_micros, provider_status, charge_lease_until
FROM top_up_attempts WHERE id = :id FOR UPDATE;

-- name: attempt_succeeded
UPDATE top_up_attempts SET status = 'succeeded', recovery_point = 'finished', provider_charge_id = :charge_id,
    provider_status = NULL, reconcile_after = NULL, updated_at = :now WHERE id = :id;

-- name: attempt_declined
UPDATE top_up_attempts SET status = :status, recovery_point = 'finished', decline_reason = :reason,
    provider_charge_id = COALESCE(provider_charge_id, :charge_id), last_error = :error,
    provider_status = NULL, reconcile_after = NULL, updated_at = :now WHERE id = :id;

-- name: attempt_processing
-- still pending: the provider has the charge but has not finished it; the
-- reconciler looks again at reconcile_after
UPDATE top_up_attempts SET provider_status = 'processing', reconcile_after = :reconcile_after,
    provider_charge_id = COALESCE(provider_charge_id, :charge_id), updated_at = :now WHERE id = :id;

-- name: declines_reset
UPDATE accounts SET auto_top_up_consecutive_declines = 0 WHERE id = :id;

-- name: declines_add
-- the counter is incremented in SQL; at the limit auto-top-up switches itself
-- off and the account's record says why and when
UPDATE accounts SET auto_top_up_consecutive_declines = auto_top_up_consecutive_declines + 1,
    auto_top_up_enabled = CASE WHEN :limit > 0 AND auto_top_up_consecutive_declines + 1 >= :limit
        THEN false ELSE auto_top_up_enabled END,
    auto_top_up_disabled_reason = CASE WHEN :limit > 0 AND auto_top_up_consecutive_declines + 1 >= :limit
        THEN 'disabled after ' || (auto_top_up_consecutive_declines + 1) || ' consecutive declined top-ups'
        ELSE auto_top_up_disabled_reason END,
    auto_top_up_disabled_at = CASE WHEN :limit > 0 AND auto_top_up_consecutive_declines + 1 >= :limit
        THEN CAST(:now AS timestamptz) ELSE auto_top_up_disabled_at END,
    updated_at = :now
WHERE id = :id
RETURNING auto_top_up_consecutive_declines AS declines, NOT auto_top_up_enabled AS disabled;

-- name: take_charge_lease
-- A charge request goes out only under a lease, only while the attempt is
-- pending and not already processing at the provider, and only within the
-- provider's idempotency-key window (Stripe keeps a key 24 h: a charge sent
-- later under the same key would be a new charge).
UPDATE top_up_attempts SET charge_lease_until = :until, updated_at = :now
WHERE id = :id AND status = 'pending' AND provider_status IS DISTINCT FROM 'processing'
  AND created_at > :window_start
RETURNING id;

-- name: reconcile_now
UPDATE top_up_attempts SET reconcile_after = LEAST(reconcile_after, :now), updated_at = :now
WHERE id = :id AND status = 'pending';
