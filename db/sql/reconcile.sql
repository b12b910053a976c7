-- The reconciler's reads of the provider's side: our attempts by provider key or charge id, the attempts within a window.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: our_attempts
SELECT t.id, t.account_id, t.provider_idempotency_key, t.amount_micros, t.currency, a.currency AS account_currency,
       t.status, t.provider_charge_id, t.provider_status, t.charge_lease_until, t.created_at,
       COALESCE(c.ids, '{}') AS credit_ids, COALESCE(c.amounts, '{}') AS credit_amounts,
       COALESCE(c.times, '{}') AS credit_times
FROM top_up_attempts t
JOIN accounts a ON a.id = t.account_id
LEFT JOIN LATERAL (
    SELECT array_agg(l.id ORDER BY l.id) AS ids, array_agg(l.amount_micros ORDER BY l.id) AS amounts,
           array_agg(l.created_at ORDER BY l.id) AS times
    FROM ledger_entries l WHERE l.top_up_attempt_id = t.id AND l.kind = 'top_up'
) c ON true
WHERE (t.created_at >= :since AND t.created_at < :until)
   OR t.provider_idempotency_key = ANY(:keys)
   OR t.provider_charge_id = ANY(:charge_ids)
   OR t.id IN (SELECT l.top_up_attempt_id FROM ledger_entries l
               WHERE l.kind = 'top_up' AND l.created_at >= :since AND l.created_at < :until)
ORDER BY t.created_at, t.id;

-- name: window_attempts
UPDATE top_up_attempts t SET reconcile_after = :relook_at, reconcile_checks = t.reconcile_checks + 1
FROM (SELECT id FROM top_up_attempts
      WHERE status = 'pending' AND created_at >= :since AND created_at < :until
        AND (charge_lease_until IS NULL OR charge_lease_until <= :now)
      ORDER BY created_at LIMIT :limit FOR UPDATE SKIP LOCKED) due
WHERE t.id = due.id
RETURNING t.id, t.account_id, t.provider_idempotency_key, t.amount_micros, t.currency, t.payment_method_ref,
          t.status, t.recovery_point, t.provider_charge_id, t.charge_lease_until, t.created_at, t.message_idempotency_key;
