"""Usage-based billing: metered usage events debited from the prepaid balance, owed usage, and has_credits.

Expand-only (SPEC "Deployment"): new columns with defaults, new tables, new
functions and triggers; the ledger's kind check gains ``usage_charge``
(added NOT VALID, then validated without blocking writes).

* ``accounts.owed_micros``: usage the balance did not cover, collected
  first by the account's next credit (``post_ledger_entry``).
* ``accounts.auto_top_up_max_per_period``: the account's own limit of
  auto-top-ups per calendar month (NULL: ``BILLING_TOP_UPS_PER_PERIOD``).
* ``usage_events``: one row per applied event (its key, amount, what was
  charged and what is owed, its ledger entry).
* ``account_entitlements``: the replica-safe ``has_credits`` flag, one row
  per account, written by a trigger on ``accounts`` (backfilled here).
* ``billing_apply_usage_v1`` (the usage rule), from its file in
  ``db/sql/functions/``, and ``billing_record_usage_batch_v1`` (the fast
  path), whose text is frozen here since migration 0012 replaced it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from __future__ import annotations

from db.sql import function_source
from migrations.sql import execute_all

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_KINDS_BEFORE = "'top_up', 'subscription_charge', 'renewal_charge', 'refund', 'adjustment'"

#: ``billing_record_usage_batch_v1`` as this migration created it (frozen: 0012 replaced its source file).
RECORD_USAGE_BATCH_V1 = """\
-- The usage fast path: the usage events that arrived together, in one round
-- trip, grouped by account.  For each account (in account order, so
-- concurrent batches lock in one order), in its own subtransaction: lock the
-- events' keys (key order) and then the account, as the Python path does;
-- events whose key is completed return their stored outcome (a duplicate),
-- the others are applied together by billing_apply_usage_v1 (one ledger
-- entry, one balance update) and their keys completed with their outcomes.
-- An error in one account's events (an unknown account, a deadlock) rolls
-- back that account's events alone and returns them as fallbacks, which the
-- worker runs one by one on the Python path; the other accounts' events
-- stand.  The keys must have been claimed before (claim_keys).  Each applied
-- event's row carries the account's auto-top-up settings, for the caller's
-- after-charge check (db.money.funds.after_charge) in the same transaction.
CREATE FUNCTION billing_record_usage_batch_v1(
    p_keys text[], p_account_ids text[], p_amounts bigint[], p_meters text[], p_quantities bigint[],
    p_occurred_at timestamptz[], p_now timestamptz)
RETURNS TABLE (o_key text, o_r jsonb) LANGUAGE plpgsql AS $$
DECLARE
    v_account text;
    v_acc record;
    v_out jsonb;
    v_group text[];
    v_keys text[];
    v_amounts bigint[];
    v_meters text[];
    v_quantities bigint[];
    v_occurred timestamptz[];
    v_results jsonb;
BEGIN
    FOR v_account IN SELECT DISTINCT a FROM unnest(p_account_ids) AS a ORDER BY a LOOP
        BEGIN
            -- every lookup by primary key (= ANY, or one probe per event): a plan cached for
            -- the function's life must never scan idempotency_keys
            v_group := ARRAY(SELECT u.k FROM unnest(p_keys, p_account_ids) AS u(k, a)
                             WHERE u.a = v_account ORDER BY u.k);
            PERFORM 1 FROM idempotency_keys AS k WHERE k.key = ANY (v_group) ORDER BY k.key FOR UPDATE;
            SELECT COALESCE(jsonb_object_agg(g.k, CASE
                       WHEN k.status IS NULL THEN jsonb_build_object('fast', 'fallback', 'why', 'unclaimed')
                       ELSE jsonb_build_object('fast', 'duplicate', 'result', k.result) END), '{}'::jsonb)
                INTO v_out
                FROM unnest(v_group) AS g(k)
                LEFT JOIN LATERAL (SELECT i.status, i.result FROM idempotency_keys AS i WHERE i.key = g.k) AS k ON true
                WHERE k.status IS NULL OR k.status = 'completed';
            SELECT array_agg(u.k ORDER BY u.k), array_agg(u.amount ORDER BY u.k), array_agg(u.meter ORDER BY u.k),
                   array_agg(u.quantity ORDER BY u.k), array_agg(u.occurred_at ORDER BY u.k)
                INTO v_keys, v_amounts, v_meters, v_quantities, v_occurred
                FROM unnest(p_keys, p_account_ids, p_amounts, p_meters, p_quantities, p_occurred_at)
                     AS u(k, a, amount, meter, quantity, occurred_at)
                WHERE u.a = v_account AND EXISTS (
                    SELECT 1 FROM idempotency_keys AS i WHERE i.key = u.k AND i.status <> 'completed');
            IF v_keys IS NOT NULL THEN
                SELECT acc.id, acc.auto_top_up_enabled, acc.auto_top_up_threshold_micros,
                       acc.auto_top_up_max_per_period INTO v_acc
                    FROM accounts AS acc WHERE acc.id = v_account FOR UPDATE;
                IF NOT FOUND THEN
                    SELECT v_out || jsonb_object_agg(k, jsonb_build_object('fast', 'fallback', 'why', 'unknown_account'))
                        INTO v_out FROM unnest(v_keys) AS k;
                ELSE
                    SELECT jsonb_object_agg(a.o_key, a.o_result) INTO v_results
                        FROM billing_apply_usage_v1(v_account, v_keys, v_amounts, v_meters, v_quantities,
                                                    v_occurred, p_now) AS a;
                    UPDATE idempotency_keys AS k SET status = 'completed', result = v_results -> k.key,
                           last_error = NULL, updated_at = p_now, account_id = COALESCE(k.account_id, v_account),
                           completed_at = p_now
                        WHERE k.key = ANY (v_keys);
                    SELECT v_out || jsonb_object_agg(e.key, jsonb_build_object(
                               'fast', 'applied', 'result', e.value,
                               'account', jsonb_build_object(
                                   'id', v_acc.id, 'auto_top_up_enabled', v_acc.auto_top_up_enabled,
                                   'auto_top_up_threshold_micros', v_acc.auto_top_up_threshold_micros,
                                   'auto_top_up_max_per_period', v_acc.auto_top_up_max_per_period)))
                        INTO v_out FROM jsonb_each(v_results) AS e;
                END IF;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            -- this account's writes are rolled back (subtransaction); the Python path runs its events one by one
            SELECT jsonb_object_agg(u.k, jsonb_build_object('fast', 'fallback', 'why', 'error',
                                                            'sqlstate', SQLSTATE, 'error', SQLERRM))
                INTO v_out
                FROM unnest(p_keys, p_account_ids) AS u(k, a) WHERE u.a = v_account;
        END;
        RETURN QUERY SELECT e.key, e.value FROM jsonb_each(v_out) AS e;
    END LOOP;
END
$$;
"""

UPGRADE: list[str] = [
    "ALTER TABLE accounts ADD COLUMN owed_micros bigint NOT NULL DEFAULT 0",
    "ALTER TABLE accounts ADD CONSTRAINT accounts_owed_non_negative CHECK (owed_micros >= 0) NOT VALID",
    "ALTER TABLE accounts VALIDATE CONSTRAINT accounts_owed_non_negative",
    "ALTER TABLE accounts ADD COLUMN auto_top_up_max_per_period integer",
    """
    ALTER TABLE accounts ADD CONSTRAINT accounts_top_up_max_per_period_range
        CHECK (auto_top_up_max_per_period IS NULL OR auto_top_up_max_per_period BETWEEN 1 AND 1000)
    """,
    "ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check",
    f"""
    ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check
        CHECK (kind IN ({_KINDS_BEFORE}, 'usage_charge')) NOT VALID
    """,
    "ALTER TABLE ledger_entries VALIDATE CONSTRAINT ledger_entries_kind_check",
    """
    ALTER TABLE ledger_entries ADD CONSTRAINT ledger_usage_is_a_debit
        CHECK (kind <> 'usage_charge' OR amount_micros < 0) NOT VALID
    """,
    "ALTER TABLE ledger_entries VALIDATE CONSTRAINT ledger_usage_is_a_debit",
    # one row per applied usage event: the event's own record, found by its key
    """
    CREATE TABLE usage_events (
        idempotency_key  text PRIMARY KEY,
        account_id       text NOT NULL REFERENCES accounts (id),
        meter            text,
        quantity         bigint CHECK (quantity >= 0),
        amount_micros    bigint NOT NULL CHECK (amount_micros > 0 AND amount_micros <= 1000000000000000),
        charged_micros   bigint NOT NULL CHECK (charged_micros >= 0),
        owed_micros      bigint NOT NULL CHECK (owed_micros >= 0),
        ledger_entry_id  bigint REFERENCES ledger_entries (id),
        occurred_at      timestamptz,
        recorded_at      timestamptz NOT NULL,
        CONSTRAINT usage_events_split CHECK (charged_micros + owed_micros = amount_micros),
        CONSTRAINT usage_events_charge_has_entry CHECK ((charged_micros > 0) = (ledger_entry_id IS NOT NULL))
    )
    """,
    "CREATE INDEX usage_events_account ON usage_events (account_id, recorded_at)",
    "CREATE INDEX usage_events_ledger_entry ON usage_events (ledger_entry_id) WHERE ledger_entry_id IS NOT NULL",
    # the replica-safe flag of the entitlement projection, one row per account
    """
    CREATE TABLE account_entitlements (
        account_id   text PRIMARY KEY REFERENCES accounts (id),
        has_credits  boolean NOT NULL,
        updated_at   timestamptz NOT NULL
    )
    """,
    function_source("billing_has_credits_v1"),
    """
    CREATE TRIGGER accounts_has_credits_on_insert AFTER INSERT ON accounts
        FOR EACH ROW EXECUTE FUNCTION billing_has_credits_v1()
    """,
    """
    CREATE TRIGGER accounts_has_credits_on_update AFTER UPDATE OF balance_micros, owed_micros ON accounts
        FOR EACH ROW
        WHEN ((OLD.balance_micros > 0 AND OLD.owed_micros = 0) IS DISTINCT FROM
              (NEW.balance_micros > 0 AND NEW.owed_micros = 0))
        EXECUTE FUNCTION billing_has_credits_v1()
    """,
    """
    INSERT INTO account_entitlements (account_id, has_credits, updated_at)
    SELECT id, balance_micros > 0 AND owed_micros = 0, now() FROM accounts
    ON CONFLICT (account_id) DO NOTHING
    """,
    function_source("billing_apply_usage_v1"),
    RECORD_USAGE_BATCH_V1,
]

_USAGE_ARGS = "text[], text[], bigint[], text[], bigint[], timestamptz[], timestamptz"

DOWNGRADE: list[str] = [
    f"DROP FUNCTION billing_record_usage_batch_v1({_USAGE_ARGS})",
    "DROP FUNCTION billing_apply_usage_v1(text, text[], bigint[], text[], bigint[], timestamptz[], timestamptz)",
    "DROP TRIGGER accounts_has_credits_on_update ON accounts",
    "DROP TRIGGER accounts_has_credits_on_insert ON accounts",
    "DROP FUNCTION billing_has_credits_v1()",
    "DROP TABLE account_entitlements",
    "DROP TABLE usage_events",
    "ALTER TABLE ledger_entries DROP CONSTRAINT ledger_usage_is_a_debit",
    "ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check",
    f"ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check CHECK (kind IN ({_KINDS_BEFORE}))",
    "ALTER TABLE accounts DROP CONSTRAINT accounts_top_up_max_per_period_range",
    "ALTER TABLE accounts DROP COLUMN auto_top_up_max_per_period",
    "ALTER TABLE accounts DROP CONSTRAINT accounts_owed_non_negative",
    "ALTER TABLE accounts DROP COLUMN owed_micros",
]


def upgrade() -> None:
    execute_all(UPGRADE)


def downgrade() -> None:
    execute_all(DOWNGRADE)
