"""Idempotency keys: a delivery's claim, the key's lock, and the outcome stored with it.

A message's key row is claimed in autocommit before its effect (that
counts the delivery even when the worker dies mid-transaction), locked
``FOR UPDATE`` at the start of the effect's transaction (concurrent
deliveries of one key run one at a time), and written with the outcome in
that same transaction.  A key that waits for funds is not delivered again
by a re-send: the scheduler re-sends a due renewal while it is due, and counting
those as deliveries killed renewals that waited on a slow top-up; only the
wait's owner (the top-up settling, or the completer) moves it on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from ..sql import one, statement
from .outbox import insert_outbox
from .policy import ClaimedKey, Effect

__all__ = ["KeyClaim", "claim_key", "claim_keys", "fail_key", "lock_key", "record_effect", "unfinished_keys"]

_CLAIM_KEYS = statement("claim_keys", json_columns=("result",))
_LOCK_KEY = statement("lock_key", json_columns=("result",))
_COMPLETE_KEY = statement("complete_key", json_params=("result",))
_FORGET_KEY = statement("forget_key")
_FAIL_KEY = statement("fail_key")
_UNFINISHED_KEYS = statement("unfinished_keys")


@dataclass(frozen=True)
class KeyClaim:
    """One delivery to claim in :func:`claim_keys`.

    Attributes:
      key: The message's idempotency key.
      kind: The actor name.
      fingerprint: The message's argument fingerprint.
      account_id: The account, when the message names it (None for ``renew``).
      message_id: Dramatiq's message id.
      request: The message (``{"actor_name", "queue_name", "kwargs"}``) the
        completer re-sends if the delivery is lost; None stores none (a
        renewal, which the scheduler sends again while its period is due)
        and keeps one stored by an earlier delivery.
    """

    key: str
    kind: str
    fingerprint: str
    account_id: str | None
    message_id: str
    request: dict[str, Any] | None = None


async def claim_keys(
    conn: AsyncConnection, claims: list[KeyClaim], *, lease_expires_at: datetime
) -> dict[str, ClaimedKey]:
    """Record one delivery of each message under its idempotency key (autocommit, before the effect).

    Counting deliveries in a statement committed *before* the effect is what
    bounds a poison message: a worker killed mid-transaction loses its
    effect, not the count.  A repeated key returns the stored outcome.  A
    key ``waiting_for_funds`` is not counted and keeps waiting (the caller
    treats the delivery as a no-op).  One statement for the whole list (the
    group commit of claims); rows are written in key order, so concurrent
    batches never wait on each other in a cycle.

    Parameters:
      claims: Deliveries with distinct keys (a key twice in one statement is
        refused by PostgreSQL's ON CONFLICT; the caller splits such batches).
      lease_expires_at: Until when these deliveries own their ``processing``
        keys (UTC); past it the completer re-drives or ends the key.

    Returns:
      Key -> its claim; ``conflict`` is true when the key was used with other arguments.
    """
    rows = (
        await conn.execute(
            _CLAIM_KEYS,
            {
                "keys": [c.key for c in claims],
                "kinds": [c.kind for c in claims],
                "fingerprints": [c.fingerprint for c in claims],
                "account_ids": [c.account_id for c in claims],
                "message_ids": [c.message_id for c in claims],
                "requests": [None if c.request is None else json.dumps(c.request) for c in claims],
                "lease_expires_at": lease_expires_at,
            },
        )
    ).mappings()
    fingerprints = {c.key: c.fingerprint for c in claims}
    return {
        row["key"]: ClaimedKey(
            status=row["status"],
            result=row["result"],
            attempts=row["attempts"],
            conflict=row["fingerprint"] != fingerprints[row["key"]],
        )
        for row in rows
    }


async def claim_key(conn: AsyncConnection, claim: KeyClaim, *, lease_expires_at: datetime) -> ClaimedKey:
    """:func:`claim_keys` for one delivery."""
    return (await claim_keys(conn, [claim], lease_expires_at=lease_expires_at))[claim.key]


async def lock_key(conn: AsyncConnection, key: str) -> dict[str, Any] | None:
    """Lock the key row for this transaction (serializes concurrent deliveries of one key).

    Returns:
      The stored outcome, marked ``duplicate``, when another delivery
      completed the key meanwhile, or marked ``waiting`` when another
      delivery left it waiting for funds (the top-up resumes it); None when
      this transaction is to apply the effect.
    """
    row = await one(conn, _LOCK_KEY, key=key)
    if row is not None and row["status"] == "completed":
        return {**(row["result"] or {}), "duplicate": True}
    if row is not None and row["status"] == "waiting_for_funds":
        return {**(row["result"] or {}), "waiting": True}
    return None


async def record_effect(conn: AsyncConnection, key: str, effect: Effect, now: datetime) -> None:
    """Write the effect's follow-up messages to the outbox and store its outcome with its key.

    Both in the effect's transaction: a follow-up is never sent for an
    effect that did not commit, nor lost for one that did.

    The key row learns its account from the effect when the message did not
    name it (``renew``, ``revoke_key``), so operators can find it by account.
    """
    await insert_outbox(conn, effect.outbox)
    if effect.key_status == "forgotten":
        # asked too early (not due yet, cancel before period end): nothing was
        # decided, so the same key asked again later is decided then
        await conn.execute(_FORGET_KEY, {"key": key})
        return
    await conn.execute(
        _COMPLETE_KEY,
        {
            "key": key,
            "status": effect.key_status,
            "result": effect.stored_result(),
            "account_id": effect.result.get("account_id"),
            "now": now,
        },
    )


async def fail_key(conn: AsyncConnection, key: str, fingerprint: str, status: str, error: str) -> None:
    """Mark a key ``failed`` (permanent error; a new delivery re-runs it) or ``dead`` (poison)."""
    await conn.execute(
        _FAIL_KEY, {"key": key, "fingerprint": fingerprint, "status": status, "error": error[:2000]}
    )


async def unfinished_keys(conn: AsyncConnection, keys: list[str]) -> set[str]:
    """Which of ``keys`` an earlier delivery claimed and did not finish (``processing``): one statement.

    A worker that died in the middle of a message leaves its key so; the
    message comes back with the others it was fetched with.
    """
    if not keys:
        return set()
    return {r[0] for r in (await conn.execute(_UNFINISHED_KEYS, {"keys": keys})).all()}
