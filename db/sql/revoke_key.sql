-- revoke_key: one key by id, or the managed keys of a subscription.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: revoke_one
UPDATE api_keys SET status = 'revoked', revoked_at = :now, revoke_reason = :reason
WHERE id = :key_id AND status = 'active' RETURNING id;

-- name: revoke_managed
-- source = 'user' keys are never touched by a billing flow: a user's own key
-- outlives every subscription
UPDATE api_keys SET status = 'revoked', revoked_at = :now, revoke_reason = :reason
WHERE subscription_id = :subscription_id AND source = 'managed' AND status = 'active' RETURNING id;
