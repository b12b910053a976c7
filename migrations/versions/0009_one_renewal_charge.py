"""One renewal charge: both renewal paths run ``billing_renew_charge_v1``.

The charge of a renewal (the ledger entry with the balance, the advanced
period, the entitlement projection) becomes one server-side function,
which the Python path (``db.money.renew.apply_renew``) and the fast path
(``billing_renew_fast_v1``, replacing ``billing_renew_fast``) both call.
The functions' text is read from their versioned source files in
``db/sql/functions/``; a changed rule is a new ``_vN`` file and a new
migration, so this one keeps creating the versions it named.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import importlib

from db.sql import function_source
from migrations.sql import execute_all

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_FAST_V0 = "billing_renew_fast(text, text, timestamptz, text, timestamptz)"

UPGRADE = [
    function_source("billing_renew_charge_v1"),
    function_source("billing_renew_fast_v1"),
    f"DROP FUNCTION {_FAST_V0}",
]


def _fast_v0() -> str:
    """``billing_renew_fast`` as migration 0005 created it (its frozen text)."""
    created = importlib.import_module("migrations.versions.0005_renew_fast_path").UPGRADE
    return next(s for s in created if "FUNCTION billing_renew_fast(" in s)


def upgrade() -> None:
    execute_all(UPGRADE)


def downgrade() -> None:
    execute_all(
        [
            _fast_v0(),
            "DROP FUNCTION billing_renew_fast_v1(text, text, timestamptz, text, timestamptz)",
            "DROP FUNCTION billing_renew_charge_v1(text, text, text, bigint, integer, timestamptz, timestamptz,"
            " timestamptz)",
        ]
    )
