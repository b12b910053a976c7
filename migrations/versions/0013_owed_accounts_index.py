"""A partial index of the accounts that owe usage, for the completer's pass.

Every scheduler pass looks for the accounts that owe usage with no top-up
coming (``db.deadlines.owed_accounts_without_top_up``).  Few accounts owe
at any time, so a partial index keeps that lookup off a scan of every
account.  Built ``CONCURRENTLY`` (outside the migration's transaction), so
writes to ``accounts`` go on while it builds.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS accounts_owing ON accounts (id) WHERE owed_micros > 0"
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS accounts_owing")
