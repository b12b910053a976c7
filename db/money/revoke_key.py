"""``revoke_key``: revoke one key by id (any source), or the managed keys of a subscription."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.messages import RevokeKeyMessage

from ..sql import statement
from .ledger import lock_owner
from .policy import Effect

__all__ = ["apply_revoke_key"]

#: Also the reissue's revocation of the key it replaces.
REVOKE_ONE = statement("revoke_one")
_REVOKE_MANAGED = statement("revoke_managed")


async def apply_revoke_key(conn: AsyncConnection, message: RevokeKeyMessage, now: datetime) -> Effect:
    """Revoke one key by ``key_id`` (any source) or the managed keys of a subscription.

    Outcomes: ``revoked`` (with ``key_ids``) or ``already_revoked`` (no-op).

    Raises:
      UnknownApiKey, UnknownSubscription: Permanent errors.
    """
    if message.key_id is not None:
        account, _ = await lock_owner(conn, key_id=message.key_id)
        rows = (
            await conn.execute(REVOKE_ONE, {"key_id": message.key_id, "now": now, "reason": message.reason})
        ).all()
    else:
        account, _ = await lock_owner(conn, subscription_id=message.subscription_id)
        rows = (
            await conn.execute(
                _REVOKE_MANAGED,
                {"subscription_id": message.subscription_id, "now": now, "reason": message.reason},
            )
        ).all()
    key_ids = sorted(r[0] for r in rows)
    return Effect(
        "revoked" if key_ids else "already_revoked", {"account_id": account["id"], "key_ids": key_ids}
    )
