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

UPGRADE: list[str] = []

DOWNGRADE: list[str] = []


def upgrade() -> None:
    execute_all(UPGRADE)


def downgrade() -> None:
    execute_all(DOWNGRADE)
