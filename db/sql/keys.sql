-- Idempotency keys: a delivery's claim, its lock, its stored outcome.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: claim_keys
-- One delivery per element, in key order (concurrent batches never wait on
-- each other in a cycle); a single message is a one-element batch.
-- A key that waits for funds is not delivered again by a re-send: the
-- scheduler re-sends a due renewal while it is due, and counting those as
-- deliveries killed renewals that waited on a slow top-up.  Only the wait's
-- owner (the top-up settling, or the completer) moves it on.
-- A NULL request (the renewal fast path stores none) keeps the stored one.
INSERT INTO idempotency_keys AS k (key, kind, fingerprint, status, attempts, account_id, message_id,
    lease_expires_at, request)
SELECT m.key, m.kind, m.fingerprint, 'processing', 1, m.account_id, m.message_id, :lease_expires_at,
    CAST(m.request AS jsonb)
FROM unnest(CAST(:keys AS text[]), CAST(:kinds AS text[]), CAST(:fingerprints AS text[]),
            CAST(:account_ids AS text[]), CAST(:message_ids AS text[]), CAST(:requests AS text[]))
     AS m(key, kind, fingerprint, account_id, message_id, request)
ORDER BY m.key
ON CONFLICT (key) DO UPDATE SET
    attempts = k.attempts + CASE
        WHEN k.fingerprint = EXCLUDED.fingerprint AND k.status NOT IN ('completed', 'waiting_for_funds')
        THEN 1 ELSE 0 END,
    message_id = CASE WHEN k.fingerprint = EXCLUDED.fingerprint AND k.status <> 'waiting_for_funds'
        THEN EXCLUDED.message_id ELSE k.message_id END,
    lease_expires_at = CASE WHEN k.fingerprint = EXCLUDED.fingerprint AND k.status = 'processing'
        THEN EXCLUDED.lease_expires_at ELSE k.lease_expires_at END,
    request = CASE WHEN k.fingerprint = EXCLUDED.fingerprint THEN COALESCE(EXCLUDED.request, k.request)
        ELSE k.request END,
    updated_at = now()
RETURNING k.key, k.status, k.fingerprint, k.result, k.attempts;

-- name: lock_key
SELECT status, result FROM idempotency_keys WHERE key = :key FOR UPDATE;

-- name: complete_key
UPDATE idempotency_keys SET status = :status, result = :result, last_error = NULL, updated_at = :now,
    account_id = COALESCE(account_id, :account_id),
    completed_at = CASE WHEN :status = 'completed' THEN CAST(:now AS timestamptz) ELSE NULL END
WHERE key = :key;

-- name: forget_key
DELETE FROM idempotency_keys WHERE key = :key;

-- name: fail_key
UPDATE idempotency_keys SET status = CASE WHEN status = 'completed' THEN status ELSE :status END,
    last_error = :error, updated_at = now()
WHERE key = :key AND fingerprint = :fingerprint;

-- name: key_status
SELECT status FROM idempotency_keys WHERE key = :key;

-- name: unfinished_keys
-- keys an earlier delivery claimed and did not finish (by primary key)
SELECT key FROM idempotency_keys WHERE key = ANY (CAST(:keys AS text[])) AND status = 'processing';

-- name: reserve_key
INSERT INTO idempotency_keys (key, kind, fingerprint, status, attempts, account_id, lease_expires_at, request)
VALUES (:key, :kind, :fingerprint, 'processing', 0, :account_id, :lease_expires_at, :request)
ON CONFLICT (key) DO NOTHING;
