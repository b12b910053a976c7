"""The usage fast path locks its batch's keys first, in key order (``billing_record_usage_batch_v2``).

``billing_record_usage_batch_v1`` locked each account's event keys inside
that account's subtransaction, so a batch took key locks in (account, key)
order while another worker's claim statement of a repeated event took them
in key order: under hot accounts and repeated event ids the two deadlocked,
and PostgreSQL rolled back the claim, failing its whole batch for a retry.
Version 2 locks every key of the batch in key order before the first
account, the order every claim uses.  Its text is read from
``db/sql/functions/billing_record_usage_batch_v2.sql``.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from __future__ import annotations

import importlib

from db.sql import function_source
from migrations.sql import execute_all

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_ARGS = "text[], text[], bigint[], text[], bigint[], timestamptz[], timestamptz"


def upgrade() -> None:
    execute_all(
        [
            function_source("billing_record_usage_batch_v2"),
            f"DROP FUNCTION billing_record_usage_batch_v1({_ARGS})",
        ]
    )


def downgrade() -> None:
    execute_all(
        [
            importlib.import_module("migrations.versions.0011_usage").RECORD_USAGE_BATCH_V1,
            f"DROP FUNCTION billing_record_usage_batch_v2({_ARGS})",
        ]
    )
