-- Messages that failed for good, kept for operators.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: record_failure
INSERT INTO failed_messages AS f (message_id, actor_name, queue_name, kwargs, idempotency_key, account_id,
    error_type, error_message, traceback, attempts, status)
VALUES (:message_id, :actor_name, :queue_name, :kwargs, :idempotency_key, :account_id,
    :error_type, :error_message, :traceback, :attempts, 'dead')
ON CONFLICT (message_id) DO UPDATE SET
    error_type = EXCLUDED.error_type, error_message = EXCLUDED.error_message, traceback = EXCLUDED.traceback,
    attempts = GREATEST(f.attempts + 1, EXCLUDED.attempts), status = 'dead', last_seen_at = now();
