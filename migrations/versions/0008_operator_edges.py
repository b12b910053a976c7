"""Operator edges: a failure is replayed once.

Expand-only (SPEC "Deployment"): new tables, and new nullable or defaulted columns.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from migrations.sql import execute_all

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# A failure is replayed once (``billing ops replay``, the dashboard's Replay):
# the replay is recorded on the failure by one conditional UPDATE
# (``... WHERE replayed_at IS NULL``), so of two replays that race, the second
# waits on the row lock, then finds it replayed and is refused.
UPGRADE: list[str] = [
    "ALTER TABLE failed_messages ADD COLUMN replayed_at timestamptz",
    "ALTER TABLE failed_messages ADD COLUMN replayed_by text",
    "ALTER TABLE failed_messages ADD COLUMN replay_key text",
    "ALTER TABLE failed_messages ADD COLUMN replay_message_id text",
    """
    ALTER TABLE failed_messages ADD CONSTRAINT failed_messages_replay_complete CHECK (
        (replayed_at IS NULL) = (replay_key IS NULL)
        AND (replayed_at IS NULL) = (replay_message_id IS NULL)
        AND (replayed_at IS NULL) = (replayed_by IS NULL)
    )
    """,
]

DOWNGRADE: list[str] = [
    "ALTER TABLE failed_messages DROP CONSTRAINT failed_messages_replay_complete",
    "ALTER TABLE failed_messages DROP COLUMN replay_message_id",
    "ALTER TABLE failed_messages DROP COLUMN replay_key",
    "ALTER TABLE failed_messages DROP COLUMN replayed_by",
    "ALTER TABLE failed_messages DROP COLUMN replayed_at",
]


def upgrade() -> None:
    execute_all(UPGRADE)


def downgrade() -> None:
    execute_all(DOWNGRADE)
