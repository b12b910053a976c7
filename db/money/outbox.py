"""The transactional outbox: follow-up messages written with the effect, relayed after commit.

A follow-up (a top-up, a ``revoke_key``, a catch-up renewal) is never sent
for an effect that did not commit, nor lost for one that did: it is a row
of ``outbox`` in the effect's transaction, sent by the worker after
commit, and by the sweeper when the worker died between commit and relay.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from ..sql import statement
from .policy import OutboxMessage

__all__ = ["claim_stale_outbox", "delete_outbox", "insert_outbox"]

_INSERT_OUTBOX = statement("insert_outbox", json_params=("messages",))
_DELETE_OUTBOX = statement("delete_outbox")
_STALE_OUTBOX = statement("stale_outbox", json_columns=("kwargs",))


async def insert_outbox(conn: AsyncConnection, messages: list[OutboxMessage]) -> None:
    """Write messages to the outbox in the effect's transaction (one statement for all)."""
    if not messages:
        return
    payload = [
        {
            "message_id": m.message_id,
            "queue_name": m.queue_name,
            "actor_name": m.actor_name,
            "kwargs": m.kwargs,
        }
        for m in messages
    ]
    await conn.execute(_INSERT_OUTBOX, {"messages": payload})


async def delete_outbox(conn: AsyncConnection, message_ids: list[str]) -> None:
    """Forget relayed outbox messages."""
    if message_ids:
        await conn.execute(_DELETE_OUTBOX, {"ids": message_ids})


async def claim_stale_outbox(
    conn: AsyncConnection, *, older_than_s: float, limit: int = 500
) -> list[OutboxMessage]:
    """Lock outbox messages left behind by a worker that died between commit and relay."""
    rows = (
        (await conn.execute(_STALE_OUTBOX, {"older_than_s": older_than_s, "limit": limit})).mappings().all()
    )
    return [OutboxMessage(r["queue_name"], r["actor_name"], r["kwargs"], r["message_id"]) for r in rows]
