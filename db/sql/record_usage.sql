-- record_usage: metered usage debited from the prepaid balance (the rule is
-- billing_apply_usage_v2 in db/sql/functions/, which both paths run).
-- Each block is one statement, loaded by name (db.sql.queries).

-- name: apply_usage
-- the Python path: one event of a locked account
SELECT u.o_key AS key, u.o_result AS result
FROM billing_apply_usage_v2(CAST(:account_ids AS text[]), CAST(:keys AS text[]), CAST(:amounts AS bigint[]),
                            CAST(:meters AS text[]), CAST(:quantities AS bigint[]),
                            CAST(:occurred_ats AS timestamptz[]), :now) AS u;

-- name: record_usage_batch
-- the fast path: the events that arrived together, grouped by account
SELECT b.o_key AS key, b.o_r AS r
FROM billing_record_usage_batch_v3(CAST(:keys AS text[]), CAST(:account_ids AS text[]),
                                   CAST(:amounts AS bigint[]), CAST(:meters AS text[]),
                                   CAST(:quantities AS bigint[]), CAST(:occurred_ats AS timestamptz[]),
                                   :now) AS b;

-- name: usage_event
SELECT idempotency_key, account_id, meter, quantity, amount_micros, charged_micros, owed_micros,
       ledger_entry_id, occurred_at, recorded_at
FROM usage_events WHERE idempotency_key = :key;
