"""Operators: retries and resolutions of failed messages, and the audit log of operator actions.

Expand-only: new defaulted or nullable columns, a new table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from migrations.sql import execute_script

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE failed_messages
    ADD COLUMN retry_count      integer NOT NULL DEFAULT 0,
    ADD COLUMN last_retried_at  timestamptz,
    ADD COLUMN last_retried_by  text,
    ADD COLUMN resolved_at      timestamptz,
    ADD COLUMN resolved_by      text,
    ADD COLUMN resolution       text;
CREATE INDEX failed_messages_account ON failed_messages (account_id, last_seen_at DESC);
CREATE INDEX failed_messages_actor ON failed_messages (actor_name, last_seen_at DESC);

-- every operator action (retry, replay, resolve, purge): who, what, when, how many
CREATE TABLE operator_actions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    operator    text NOT NULL,
    via         text NOT NULL CHECK (via IN ('cli', 'dashboard')),
    action      text NOT NULL,
    target      jsonb NOT NULL DEFAULT '{}'::jsonb,
    count       integer NOT NULL DEFAULT 0,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX operator_actions_at ON operator_actions (at DESC)
"""

DOWNGRADE = """
DROP TABLE operator_actions;
DROP INDEX failed_messages_actor;
DROP INDEX failed_messages_account;
ALTER TABLE failed_messages DROP COLUMN resolution, DROP COLUMN resolved_by, DROP COLUMN resolved_at,
    DROP COLUMN last_retried_by, DROP COLUMN last_retried_at, DROP COLUMN retry_count
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
