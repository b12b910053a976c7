"""The SQL of durable API key delivery: sealed ciphertexts kept in PostgreSQL until acknowledged.

Flow (migration 0007, docs/operations.md "API key delivery"):

1. The transaction that inserts a managed key (``subscribe``, or an
   operator's reissue) seals the plaintext to the recipient's public key
   (the account's row in ``api_key_recipients``, else the deployment's
   ``BILLING_KEY_DELIVERY_PUBLIC_KEY``) and inserts an
   ``api_key_deliveries`` row with the ciphertext only
   (:func:`record_delivery`), plus a ``NOTIFY billing_api_key_deliveries``
   that PostgreSQL sends on commit.  Either both the key and its delivery
   commit, or neither.
2. The consumer (the service that hands keys to customers; it holds the
   private key) reads the pending rows sealed to its key with
   ``FOR UPDATE SKIP LOCKED`` (:func:`fetch_pending`), opens them, hands
   them over, then acknowledges them (:func:`acknowledge`) in the same
   transaction: the row becomes ``acknowledged`` and its ciphertext is
   dropped.  A consumer that dies before commit leaves the rows pending, so
   they are read again (at least once: hand-over must be idempotent by
   ``key_id``).
3. A pending row has a deadline (``deliver_by``); ``billing audit`` flags
   one past it.  A reissue supersedes the old key's pending delivery.

Nothing here can open a ciphertext: the worker never has a private key.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam
from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.errors import UnknownAccount
from tasks.key_sealing import canonical_public_key, seal_api_key

from .sql import statement

__all__ = [
    "NOTIFY_CHANNEL",
    "PendingDelivery",
    "recipient_for",
    "record_delivery",
    "supersede_pending",
    "fetch_pending",
    "acknowledge",
    "set_recipient",
    "reissue_of",
    "list_deliveries",
]

#: PostgreSQL NOTIFY channel; the payload is a delivery id (never a secret), sent on commit.
NOTIFY_CHANNEL = "billing_api_key_deliveries"


@dataclass(frozen=True)
class PendingDelivery:
    """A pending delivery as the consumer reads it (the ciphertext, never a plaintext).

    Attributes:
      delivery_id: ``dlv_…``.
      key_id, account_id, subscription_id, prefix: The key it carries.
      reason: ``issued`` or ``reissued``.
      sealed_box: The ciphertext (libsodium sealed box of :func:`tasks.key_sealing.seal_api_key`).
      key_hash: ``api_keys.key_hash`` (SHA-256 hex of the plaintext), to check the opened key against.
      key_status: ``api_keys.status`` now (``revoked``: hand-over is moot, acknowledge it anyway).
      created_at, deliver_by: When it was written and its deadline (UTC).
    """

    delivery_id: str
    key_id: str
    account_id: str
    subscription_id: str | None
    prefix: str
    reason: str
    sealed_box: bytes = field(repr=False)
    key_hash: str = field(repr=False)
    key_status: str
    created_at: datetime
    deliver_by: datetime


_RECIPIENT = statement("key_recipient")


async def recipient_for(conn: AsyncConnection, account_id: str, default_public_key: str | None) -> str | None:
    """The public key (base64) an account's keys are sealed to: its own, else the deployment's, else None."""
    row = (await conn.execute(_RECIPIENT, {"account_id": account_id})).one_or_none()
    if row is not None:
        return str(row[0])
    return canonical_public_key(default_public_key) if default_public_key else None


_INSERT_DELIVERY = statement("insert_key_delivery")
_NOTIFY = statement("notify_key_delivery")


async def record_delivery(
    conn: AsyncConnection,
    *,
    key_id: str,
    account_id: str,
    subscription_id: str | None,
    prefix: str,
    plaintext: str,
    now: datetime,
    default_public_key: str | None,
    deadline: timedelta,
    reason: str = "issued",
    replaces_key_id: str | None = None,
    reissue_idempotency_key: str | None = None,
) -> str | None:
    """Seal a just-inserted key and queue its delivery, in the caller's transaction.

    Parameters:
      plaintext: The key; sealed here and not kept.
      default_public_key: The deployment's base64 public key (None: only an account's own).
      deadline: How long the delivery may stay unacknowledged (``deliver_by = now + deadline``).
      reason: ``issued`` or ``reissued`` (with ``replaces_key_id`` and ``reissue_idempotency_key``).

    Returns:
      The delivery id, or None when no public key is configured for the account
      (the caller falls back to the old, lossy pub/sub delivery).

    Raises:
      tasks.errors.ConfigurationError: The configured public key is not base64 of 32 bytes.
    """
    recipient = await recipient_for(conn, account_id, default_public_key)
    if recipient is None:
        return None
    sealed = seal_api_key(
        recipient,
        key_id=key_id,
        account_id=account_id,
        subscription_id=subscription_id,
        prefix=prefix,
        api_key=plaintext,
    )
    delivery_id = "dlv_" + uuid.uuid4().hex
    await conn.execute(
        _INSERT_DELIVERY,
        {
            "id": delivery_id,
            "key_id": key_id,
            "account_id": account_id,
            "subscription_id": subscription_id,
            "prefix": prefix,
            "reason": reason,
            "replaces_key_id": replaces_key_id,
            "reissue_idempotency_key": reissue_idempotency_key,
            "recipient": recipient,
            "sealed_box": sealed,
            "deliver_by": now + deadline,
            "now": now,
        },
    )
    await conn.execute(_NOTIFY, {"channel": NOTIFY_CHANNEL, "payload": delivery_id})
    return delivery_id


_SUPERSEDE = statement("supersede_key_delivery")


async def supersede_pending(conn: AsyncConnection, key_id: str) -> list[str]:
    """Drop the pending delivery of a key that was replaced (its ciphertext goes). Returns the ids."""
    return [str(r[0]) for r in (await conn.execute(_SUPERSEDE, {"key_id": key_id})).all()]


_FETCH = statement("fetch_key_deliveries")


async def fetch_pending(
    conn: AsyncConnection, *, recipient_public_key: str, limit: int = 100
) -> list[PendingDelivery]:
    """Lock and read up to ``limit`` pending deliveries sealed to ``recipient_public_key``, oldest first.

    Run it in a transaction, and :func:`acknowledge` what was handed over
    before commit.  Rows another consumer holds are skipped (SKIP LOCKED).

    Raises:
      tasks.errors.ConfigurationError: ``recipient_public_key`` is not base64 of 32 bytes.
    """
    rows = (
        await conn.execute(_FETCH, {"recipient": canonical_public_key(recipient_public_key), "limit": limit})
    ).mappings()
    return [
        PendingDelivery(
            delivery_id=r["id"],
            key_id=r["key_id"],
            account_id=r["account_id"],
            subscription_id=r["subscription_id"],
            prefix=r["prefix"],
            reason=r["reason"],
            sealed_box=bytes(r["sealed_box"]),
            key_hash=r["key_hash"],
            key_status=r["key_status"],
            created_at=r["created_at"],
            deliver_by=r["deliver_by"],
        )
        for r in rows
    ]


_ACKNOWLEDGE = statement("acknowledge_key_deliveries").bindparams(bindparam("ids", expanding=True))


async def acknowledge(conn: AsyncConnection, delivery_ids: list[str], *, by: str, now: datetime) -> list[str]:
    """Mark deliveries handed over: ``acknowledged``, ciphertext dropped. Returns the ids changed, in the given order.

    Parameters:
      by: Who acknowledged (the consumer's name), kept with the row.
    """
    if not delivery_ids:
        return []
    rows = (await conn.execute(_ACKNOWLEDGE, {"ids": list(delivery_ids), "by": by, "now": now})).all()
    changed = {str(r[0]) for r in rows}  # UPDATE ... RETURNING has no order
    return [d for d in delivery_ids if d in changed]


_SET_RECIPIENT = statement("set_key_recipient")
_CLEAR_RECIPIENT = statement("clear_key_recipient")
_ACCOUNT_EXISTS = statement("share_lock_account")


async def set_recipient(
    conn: AsyncConnection, account_id: str, public_key: str | None, *, now: datetime
) -> None:
    """Set (or, with None, clear) the public key an account's issued keys are sealed to.

    Raises:
      tasks.errors.ConfigurationError: ``public_key`` is not base64 of 32 bytes.
      tasks.errors.UnknownAccount: No such account.
    """
    exists = (await conn.execute(_ACCOUNT_EXISTS, {"account_id": account_id})).one_or_none()
    if exists is None:
        raise UnknownAccount(f"unknown account {account_id!r}")
    if public_key is None:
        await conn.execute(_CLEAR_RECIPIENT, {"account_id": account_id})
        return
    await conn.execute(
        _SET_RECIPIENT, {"account_id": account_id, "public_key": canonical_public_key(public_key), "now": now}
    )


_REISSUE_OF = statement("reissue_of_key")


async def reissue_of(conn: AsyncConnection, idempotency_key: str) -> dict[str, Any] | None:
    """The reissue already done under ``idempotency_key`` (its delivery row), or None."""
    row = (await conn.execute(_REISSUE_OF, {"key": idempotency_key})).mappings().one_or_none()
    return dict(row) if row is not None else None


_LIST = statement("list_key_deliveries")


async def list_deliveries(
    conn: AsyncConnection, *, account_id: str | None = None, status: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Deliveries, newest first, without ciphertexts (for operators)."""
    rows = await conn.execute(_LIST, {"account_id": account_id, "status": status, "limit": limit})
    return [dict(r) for r in rows.mappings().all()]
