-- The transactional outbox: written with the effect, relayed after commit.
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: insert_outbox
INSERT INTO outbox (message_id, queue_name, actor_name, kwargs)
SELECT m->>'message_id', m->>'queue_name', m->>'actor_name', m->'kwargs'
FROM jsonb_array_elements(:messages) AS m;

-- name: delete_outbox
DELETE FROM outbox WHERE message_id = ANY(:ids);

-- name: stale_outbox
SELECT message_id, queue_name, actor_name, kwargs FROM outbox
WHERE created_at < now() - make_interval(secs => :older_than_s)
ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED;
