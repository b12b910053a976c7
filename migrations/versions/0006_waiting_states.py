"""Deadlines for every state that waits: key leases, top-up reconciliation, cancel at period end.

Expand-only (SPEC "Deployment"): new tables, and new nullable or defaulted columns.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from migrations.sql import execute_all

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE: list[str] = []

DOWNGRADE: list[str] = []


def upgrade() -> None:
    execute_all(UPGRADE)


def downgrade() -> None:
    execute_all(DOWNGRADE)
