"""Deadlines for every state that waits: key leases, top-up reconciliation, the fake provider's processing.

* ``idempotency_keys.lease_expires_at``: a key in ``processing`` belongs to
  the delivery that claimed it until then; past it, the completer (each
  scheduler pass) re-drives it from ``request`` (the message as the
  database knows it: a reserved top-up slot, a resumed wait, a Python-path
  claim) or ends it as ``failed`` and visible.  ``redrives`` bounds that.
* ``top_up_attempts``: ``reconcile_after`` is when the reconciler looks a
  pending attempt up at the provider; ``provider_status`` is the last
  non-final answer (``processing``); ``charge_lease_until`` is set before
  every charge request, so the reconciler never settles an attempt as
  failed while a charge may still be on its way to the provider;
  ``reconcile_checks`` counts the reconciler's lookups (for operators).
* ``fake_provider_charges`` learns ``processing`` (a bank debit that
  settles later, at ``settles_at``) and a ``failed`` settlement.

Expand-only (SPEC "Deployment"): new nullable or defaulted columns, partial
indexes, a CHECK widened; a worker of the previous revision keeps working.

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

UPGRADE: list[str] = [
    """
    ALTER TABLE idempotency_keys
        ADD COLUMN lease_expires_at timestamptz,
        ADD COLUMN request jsonb,
        ADD COLUMN redrives integer NOT NULL DEFAULT 0
    """,
    # the completer's scan and the audit's: only keys that wait are in it
    """
    CREATE INDEX idempotency_keys_unfinished ON idempotency_keys (lease_expires_at)
        WHERE status IN ('processing', 'waiting_for_funds')
    """,
    # keys in flight when this revision lands get a lease from their last update
    """
    UPDATE idempotency_keys SET lease_expires_at = updated_at + interval '15 minutes'
        WHERE status = 'processing'
    """,
    """
    ALTER TABLE top_up_attempts
        ADD COLUMN reconcile_after timestamptz,
        ADD COLUMN provider_status text,
        ADD COLUMN charge_lease_until timestamptz,
        ADD COLUMN reconcile_checks integer NOT NULL DEFAULT 0
    """,
    "UPDATE top_up_attempts SET reconcile_after = updated_at WHERE status = 'pending'",
    "CREATE INDEX top_up_attempts_pending ON top_up_attempts (reconcile_after) WHERE status = 'pending'",
    "ALTER TABLE fake_provider_charges DROP CONSTRAINT fake_provider_charges_status_check",
    """
    ALTER TABLE fake_provider_charges
        ADD CONSTRAINT fake_provider_charges_status_check
            CHECK (status IN ('succeeded', 'declined', 'processing', 'failed')),
        ADD COLUMN settles_as text CHECK (settles_as IN ('succeeded', 'failed')),
        ADD COLUMN settles_at timestamptz
    """,
]

DOWNGRADE: list[str] = [
    """
    ALTER TABLE fake_provider_charges DROP COLUMN settles_at, DROP COLUMN settles_as,
        DROP CONSTRAINT fake_provider_charges_status_check
    """,
    """
    ALTER TABLE fake_provider_charges ADD CONSTRAINT fake_provider_charges_status_check
        CHECK (status IN ('succeeded', 'declined')) NOT VALID
    """,
    "DROP INDEX top_up_attempts_pending",
    """
    ALTER TABLE top_up_attempts DROP COLUMN reconcile_checks,
        DROP COLUMN charge_lease_until, DROP COLUMN provider_status, DROP COLUMN reconcile_after
    """,
    "DROP INDEX idempotency_keys_unfinished",
    "ALTER TABLE idempotency_keys DROP COLUMN redrives, DROP COLUMN request, DROP COLUMN lease_expires_at",
]


def upgrade() -> None:
    execute_all(UPGRADE)


def downgrade() -> None:
    execute_all(DOWNGRADE)
