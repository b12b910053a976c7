"""The ledger is append-only: a trigger refuses UPDATE and DELETE of ledger rows.

The last line of defence behind the worker role's grants (``billing db
grant``), which do not include UPDATE or DELETE on ``ledger_entries``: even
the owner cannot rewrite history by accident.  A correction is a new
``adjustment`` or ``refund`` entry.  (TRUNCATE, a table-level operation kept
for test suites and disaster recovery, is not a row change and needs the
owner.)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from migrations.sql import execute_all

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UPGRADE = [
    r"""
    CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'ledger_entries is append-only: % of entry % refused (post an adjustment instead)',
            TG_OP, OLD.id USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    """
    CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
        FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()
    """,
]

DOWNGRADE = [
    "DROP TRIGGER ledger_entries_append_only ON ledger_entries",
    "DROP FUNCTION ledger_entries_append_only()",
]


def upgrade() -> None:
    execute_all(UPGRADE)


def downgrade() -> None:
    execute_all(DOWNGRADE)
