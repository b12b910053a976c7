-- Sealed API key deliveries: written with the key, fetched by the deliverer, acknowledged by the consumer; the accounts' public keys.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: key_recipient
SELECT public_key FROM api_key_recipients WHERE account_id = :account_id;

-- name: insert_key_delivery
INSERT INTO api_key_deliveries (id, key_id, account_id, subscription_id, prefix, reason, replaces_key_id,
    reissue_idempotency_key, recipient_public_key, sealed_box, status, deliver_by, created_at)
VALUES (:id, :key_id, :account_id, :subscription_id, :prefix, :reason, :replaces_key_id,
    :reissue_idempotency_key, :recipient, :sealed_box, 'pending', :deliver_by, :now);

-- name: notify_key_delivery
SELECT pg_notify(:channel, :payload);

-- name: supersede_key_delivery
UPDATE api_key_deliveries SET status = 'superseded', sealed_box = NULL
WHERE key_id = :key_id AND status = 'pending' RETURNING id;

-- name: fetch_key_deliveries
SELECT d.id, d.key_id, d.account_id, d.subscription_id, d.prefix, d.reason, d.sealed_box, k.key_hash,
    k.status AS key_status, d.created_at, d.deliver_by
FROM api_key_deliveries d JOIN api_keys k ON k.id = d.key_id
WHERE d.status = 'pending' AND d.recipient_public_key = :recipient
ORDER BY d.created_at, d.id
LIMIT :limit
FOR UPDATE OF d SKIP LOCKED;

-- name: acknowledge_key_deliveries
UPDATE api_key_deliveries SET status = 'acknowledged', sealed_box = NULL, acknowledged_at = :now,
    acknowledged_by = :by
WHERE id IN :ids AND status = 'pending' RETURNING id;

-- name: set_key_recipient
INSERT INTO api_key_recipients (account_id, public_key, created_at, updated_at)
VALUES (:account_id, :public_key, :now, :now)
ON CONFLICT (account_id) DO UPDATE SET public_key = EXCLUDED.public_key, updated_at = EXCLUDED.updated_at;

-- name: clear_key_recipient
DELETE FROM api_key_recipients WHERE account_id = :account_id;

-- name: share_lock_account
SELECT 1 FROM accounts WHERE id = :account_id FOR SHARE;

-- name: reissue_of_key
SELECT id AS delivery_id, key_id, replaces_key_id, prefix, account_id, subscription_id, created_at
FROM api_key_deliveries WHERE reissue_idempotency_key = :key;

-- name: list_key_deliveries
SELECT id AS delivery_id, key_id, account_id, subscription_id, prefix, reason, replaces_key_id, status,
    created_at, deliver_by, acknowledged_at, acknowledged_by
FROM api_key_deliveries
WHERE (CAST(:account_id AS text) IS NULL OR account_id = :account_id)
  AND (CAST(:status AS text) IS NULL OR status = :status)
ORDER BY created_at DESC, id LIMIT :limit;
