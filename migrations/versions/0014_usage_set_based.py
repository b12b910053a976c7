"""The usage fast path in a fixed number of statements per batch (``billing_record_usage_batch_v3``).

``billing_record_usage_batch_v2`` ran a subtransaction per account, each
with a call of ``billing_apply_usage_v1`` (one account's events): about
0.9 ms of PostgreSQL per account, so a batch of 13 events took 11 ms and
one of 256 events 87 ms; and past 64 subtransactions a transaction
overflows its backend's subtransaction cache, which slows every snapshot
on the server.  ``billing_apply_usage_v2`` applies the events of any number
of (locked) accounts in one statement, the same rule, and version 3 of the
batch runs it once per batch, in one subtransaction (2.8 ms and 17 ms for
the same batches).  The Python path of one event runs the same
``billing_apply_usage_v2``.

Expand-only (SPEC "Deployment"): workers of the previous release call
``billing_record_usage_batch_v2`` and ``billing_apply_usage_v1`` until they
stop, so both stay (and their source files with them); a later migration
drops them once no such worker runs.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01
"""

from __future__ import annotations

from db.sql import function_source
from migrations.sql import execute_all

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_ARGS = "text[], text[], bigint[], text[], bigint[], timestamptz[], timestamptz"


def upgrade() -> None:
    execute_all([function_source("billing_apply_usage_v2"), function_source("billing_record_usage_batch_v3")])


def downgrade() -> None:
    execute_all(
        [
            f"DROP FUNCTION billing_record_usage_batch_v3({_ARGS})",
            f"DROP FUNCTION billing_apply_usage_v2({_ARGS})",
        ]
    )
