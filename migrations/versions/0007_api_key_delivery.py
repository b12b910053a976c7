"""Durable delivery of issued API keys: sealed ciphertexts kept until the consumer acknowledges them.

Expand-only (SPEC "Deployment"): new tables, and new nullable or defaulted columns.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from migrations.sql import execute_all

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UPGRADE: list[str] = []

DOWNGRADE: list[str] = []


def upgrade() -> None:
    execute_all(UPGRADE)


def downgrade() -> None:
    execute_all(DOWNGRADE)
