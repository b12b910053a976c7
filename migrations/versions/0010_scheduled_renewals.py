"""The scheduler remembers what it enqueued: a due renewal the queue still holds is not sent again.

Expand-only (SPEC "Deployment"): one new table.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

from migrations.sql import execute_all

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# One row per subscription: the last renewal the scheduler enqueued for it
# (period and dunning retry), when (by the scheduler's clock) and under which
# broker message id.  A pass sends a due renewal again only once
# BILLING_SCHEDULER_RESEND_AFTER_MS has passed and the broker no longer holds
# that message (consumed, dead-lettered or lost), so a backlog is not
# flooded with copies of what it already holds.  UNLOGGED: the table is a
# cache of sends, written for every renewal enqueued, and skipping the WAL
# keeps it cheap; after a crash or a failover it starts empty, and the
# scheduler then sends each due renewal once more (a duplicate the actor
# drops by its key), as it did at every pass before.  No foreign key to
# subscriptions: its check would take a KEY SHARE lock that waits on a
# renewal holding the subscription's row lock (subscriptions are never
# deleted, so no row is orphaned).
UPGRADE: list[str] = [
    """
    CREATE UNLOGGED TABLE scheduled_renewals (
        subscription_id text PRIMARY KEY,
        period_start timestamptz NOT NULL,
        retry integer NOT NULL CHECK (retry >= 0),
        enqueued_at timestamptz NOT NULL,
        broker_message_id text
    )
    """,
]

DOWNGRADE: list[str] = [
    "DROP TABLE scheduled_renewals",
]


def upgrade() -> None:
    execute_all(UPGRADE)


def downgrade() -> None:
    execute_all(DOWNGRADE)
