"""Durable API key delivery, the service side: reissue a managed key, consume sealed deliveries.

The SQL is in :mod:`db.key_delivery` (and :func:`db.money.reissue_managed_key`);
the sealed-box format in :mod:`tasks.key_sealing`.  ``examples/key_consumer.py``
is the same consumer written with asyncpg and PyNaCl only, for services that
do not import this project.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from db import key_delivery as sql
from db import money
from db.engine import transaction
from db.money import BillingPolicy
from db.operators import record_action
from tasks.key_sealing import SealedKey, open_api_key, parse_private_key, public_key_of

__all__ = ["ConsumedKey", "reissue_key", "consume_deliveries", "set_recipient"]


@dataclass(frozen=True)
class ConsumedKey:
    """A delivery opened by :func:`consume_deliveries` and about to be acknowledged.

    Attributes:
      delivery_id: The ``api_key_deliveries`` row.
      key: The opened key (its plaintext is in ``key.api_key``; never log it).
      key_status: ``active``, or ``revoked`` when the key was revoked since it was issued.
      reason: ``issued`` or ``reissued``.
    """

    delivery_id: str
    key: SealedKey = field(repr=False)
    key_status: str
    reason: str


async def reissue_key(
    engine: AsyncEngine,
    *,
    key_id: str,
    idempotency_key: str,
    policy: BillingPolicy,
    operator: str,
    via: str,
    now: datetime,
) -> dict[str, Any]:
    """Revoke a managed key and issue its replacement, sealed for delivery, audit-logged, in one transaction.

    Exactly once per ``idempotency_key`` (see :func:`db.money.reissue_managed_key`);
    every call, a repeat included, is written to ``operator_actions`` as
    ``reissue_key``.

    Returns:
      The outcome of :func:`db.money.reissue_managed_key`.

    Raises:
      tasks.errors.UnknownApiKey, tasks.errors.IdempotencyConflict, db.money.KeyNotReissuable,
      tasks.errors.ConfigurationError: As :func:`db.money.reissue_managed_key`; nothing is changed.
    """
    async with transaction(engine) as conn:
        outcome = await money.reissue_managed_key(
            conn, key_id=key_id, idempotency_key=idempotency_key, now=now, policy=policy
        )
        await record_action(
            conn,
            operator=operator,
            via=via,
            action="reissue_key",
            target={"key_id": key_id},
            count=0 if outcome["repeat"] else 1,
            details={
                "idempotency_key": idempotency_key,
                "new_key_id": outcome["key_id"],
                "delivery_id": outcome["delivery_id"],
                "repeat": outcome["repeat"],
            },
        )
    return outcome


async def consume_deliveries(
    engine: AsyncEngine,
    private_key_b64: str,
    hand_over: Callable[[ConsumedKey], Awaitable[None]],
    *,
    consumer: str,
    now: datetime,
    limit: int = 100,
) -> list[str]:
    """Read the pending deliveries sealed to this private key, hand each over, acknowledge them; one transaction.

    Each delivery is opened, checked against its row (the sealed document
    names the same key, and the plaintext hashes to ``api_keys.key_hash``),
    passed to ``hand_over``, and acknowledged before commit.  If
    ``hand_over`` raises, nothing is acknowledged and every delivery stays
    pending for the next call (so ``hand_over`` must be idempotent by key id).

    Parameters:
      private_key_b64: The recipient's X25519 private key, base64.
      consumer: Kept as ``acknowledged_by``.
      limit: Most deliveries in one call.

    Returns:
      The acknowledged delivery ids, oldest first.

    Raises:
      tasks.errors.ConfigurationError: The private key is not base64 of 32 bytes.
      ValueError: A delivery does not open to the key its row names (tampered with); nothing is acknowledged.
      nacl.exceptions.CryptoError: A delivery sealed to this key does not open; nothing is acknowledged.
    """
    private_key = parse_private_key(private_key_b64)
    async with transaction(engine) as conn:
        pending = await sql.fetch_pending(conn, recipient_public_key=public_key_of(private_key), limit=limit)
        for delivery in pending:
            opened = open_api_key(private_key, delivery.sealed_box, expect_key_id=delivery.key_id)
            if money.hash_api_key(opened.api_key) != delivery.key_hash:
                raise ValueError(f"delivery {delivery.delivery_id}: the sealed key does not match its hash")
            await hand_over(ConsumedKey(delivery.delivery_id, opened, delivery.key_status, delivery.reason))
        return await sql.acknowledge(conn, [d.delivery_id for d in pending], by=consumer, now=now)


async def set_recipient(
    engine: AsyncEngine, account_id: str, public_key: str | None, *, now: datetime
) -> None:
    """Set (None: clear) the public key an account's keys are sealed to, instead of the deployment's.

    Raises:
      tasks.errors.UnknownAccount: No such account.
      tasks.errors.ConfigurationError: ``public_key`` is not base64 of 32 bytes.
    """
    async with transaction(engine) as conn:
        await sql.set_recipient(conn, account_id, public_key, now=now)
