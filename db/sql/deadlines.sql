-- The owners of the states that wait: the completer's stale keys, the reconciler's due attempts, the message keys they settle.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: stale_keys
SELECT key, kind, request, redrives, account_id, message_id FROM idempotency_keys
WHERE status = 'processing' AND (lease_expires_at <= :now OR lease_expires_at IS NULL)
ORDER BY lease_expires_at NULLS FIRST LIMIT :limit FOR UPDATE SKIP LOCKED;

-- name: redrive_key
UPDATE idempotency_keys SET redrives = redrives + 1, lease_expires_at = :lease_expires_at, updated_at = :now
WHERE key = :key;

-- name: end_stale_key
UPDATE idempotency_keys SET status = 'failed', last_error = :error, updated_at = :now
WHERE key = :key AND status = 'processing';

-- name: lock_account_for_waits
SELECT id FROM accounts WHERE id = :account_id FOR UPDATE;

-- name: due_attempts
UPDATE top_up_attempts t SET reconcile_after = :relook_at, reconcile_checks = t.reconcile_checks + 1
FROM (SELECT id FROM top_up_attempts
      WHERE status = 'pending' AND reconcile_after <= :now
        AND (charge_lease_until IS NULL OR charge_lease_until <= :now)
      ORDER BY reconcile_after LIMIT :limit FOR UPDATE SKIP LOCKED) due
WHERE t.id = due.id
RETURNING t.id, t.account_id, t.provider_idempotency_key, t.amount_micros, t.currency, t.payment_method_ref,
          t.status, t.recovery_point, t.provider_charge_id, t.charge_lease_until, t.created_at, t.message_idempotency_key;

-- name: settle_message_key
UPDATE idempotency_keys SET status = 'completed', result = :result, last_error = NULL, updated_at = :now,
    completed_at = :now
WHERE key = :key AND (status <> 'completed'
                      OR result->>'outcome' IN ('top_up_reconciling', 'top_up_processing'));
