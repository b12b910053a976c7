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
* ``billing_apply_usage_v1`` (the usage rule) and
  ``billing_record_usage_batch_v1`` (the fast path), from their files in
  ``db/sql/functions/``.

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
    function_source("billing_record_usage_batch_v1"),
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
