-- API keys: only the hash of a key is stored.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: insert_api_key
INSERT INTO api_keys (id, account_id, subscription_id, source, prefix, key_hash, status, created_at)
VALUES (:id, :account_id, :subscription_id, :source, :prefix, :key_hash, 'active', :now);

-- name: reissue_lock
SELECT pg_advisory_xact_lock(hashtextextended('reissue_key:' || :key, 0));

-- name: lock_api_key
SELECT id, account_id, subscription_id, source, status FROM api_keys WHERE id = :key_id FOR UPDATE;

-- name: lock_subscription_status
SELECT status FROM subscriptions WHERE id = :subscription_id FOR UPDATE;
