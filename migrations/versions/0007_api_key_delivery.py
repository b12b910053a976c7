"""Durable delivery of issued API keys: sealed ciphertexts kept until the consumer acknowledges them.

* ``api_key_deliveries``: one row per issued (or reissued) managed key whose
  plaintext was sealed to a recipient's public key (libsodium sealed box,
  :mod:`tasks.key_sealing`), written in the transaction that inserts the
  key.  It stays ``pending`` with its ciphertext until the consumer
  acknowledges it (then ``acknowledged``, ciphertext dropped), or until the
  key is reissued (``superseded``, ciphertext dropped).  ``deliver_by`` is
  its deadline (``BILLING_KEY_DELIVERY_DEADLINE_MS``); ``billing audit``
  flags a pending delivery past it.  A reissue carries the operator's
  idempotency key (UNIQUE: one reissue per key) and the key it replaces.
* ``api_key_recipients``: an account's own public key, which takes
  precedence over the deployment's ``BILLING_KEY_DELIVERY_PUBLIC_KEY``.

The plaintext is never stored: only the sealed box, which the worker itself
cannot open.

Expand-only (SPEC "Deployment"): two new tables; a worker of the previous
revision keeps working (it never writes them).

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

UPGRADE: list[str] = [
    """
    CREATE TABLE api_key_recipients (
        account_id  text PRIMARY KEY REFERENCES accounts (id),
        public_key  text NOT NULL CHECK (public_key ~ '^[A-Za-z0-9+/]{43}=$'),
        created_at  timestamptz NOT NULL DEFAULT now(),
        updated_at  timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE api_key_deliveries (
        id                       text PRIMARY KEY,
        key_id                   text NOT NULL UNIQUE REFERENCES api_keys (id),
        account_id               text NOT NULL REFERENCES accounts (id),
        subscription_id          text REFERENCES subscriptions (id),
        prefix                   text NOT NULL,
        reason                   text NOT NULL CHECK (reason IN ('issued', 'reissued')),
        replaces_key_id          text REFERENCES api_keys (id),
        reissue_idempotency_key  text UNIQUE,
        recipient_public_key     text NOT NULL CHECK (recipient_public_key ~ '^[A-Za-z0-9+/]{43}=$'),
        sealed_box               bytea,
        status                   text NOT NULL DEFAULT 'pending'
                                 CHECK (status IN ('pending', 'acknowledged', 'superseded')),
        deliver_by               timestamptz NOT NULL,
        created_at               timestamptz NOT NULL,
        acknowledged_at          timestamptz,
        acknowledged_by          text,
        CONSTRAINT api_key_deliveries_sealed_while_pending CHECK ((status = 'pending') = (sealed_box IS NOT NULL)),
        CONSTRAINT api_key_deliveries_acknowledged_at CHECK ((status = 'acknowledged') = (acknowledged_at IS NOT NULL)),
        CONSTRAINT api_key_deliveries_reissue CHECK (
            (reason = 'reissued') = (replaces_key_id IS NOT NULL AND reissue_idempotency_key IS NOT NULL)),
        CONSTRAINT api_key_deliveries_deadline CHECK (deliver_by >= created_at)
    )
    """,
    # the consumer's scan: pending deliveries sealed to its key, oldest first
    """
    CREATE INDEX api_key_deliveries_pending ON api_key_deliveries (recipient_public_key, created_at)
        WHERE status = 'pending'
    """,
    # the audit's: pending deliveries by deadline
    "CREATE INDEX api_key_deliveries_deadline ON api_key_deliveries (deliver_by) WHERE status = 'pending'",
    "CREATE INDEX api_key_deliveries_account ON api_key_deliveries (account_id)",
]

DOWNGRADE: list[str] = [
    "DROP TABLE IF EXISTS api_key_deliveries",
    "DROP TABLE IF EXISTS api_key_recipients",
]


def upgrade() -> None:
    execute_all(UPGRADE)


def downgrade() -> None:
    execute_all(DOWNGRADE)
