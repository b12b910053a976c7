"""Charges that need funds: the auto-top-up they trigger, and the messages waiting for it.

A subscribe or renew that finds the balance short asks for an auto-top-up
(:func:`trigger_top_up`) and waits for it (``funds_waits``); the top-up's
settlement resumes the waits (:func:`resume_waiting`).  A charge that
leaves the balance under the account's threshold asks for one too
(:func:`after_charge`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.messages import AutoTopUpMessage, BillingMessage

from ..periods import top_up_period
from ..sql import one, statement
from .policy import BillingPolicy, OutboxMessage

__all__ = ["after_charge", "resume_waiting", "trigger_top_up"]

_PERIOD_TOP_UPS = statement("period_top_ups")
_KEY_STATUS = statement("key_status")
_TOP_UP_PROCESSING = statement("top_up_processing")
_RESERVE_KEY = statement("reserve_key", json_params=("request",))
_REGISTER_WAIT = statement("register_wait", json_params=("kwargs",))
_WAITS = statement("resume_waits", json_columns=("kwargs",))


async def trigger_top_up(
    conn: AsyncConnection,
    account: Mapping[Any, Any],
    now: datetime,
    policy: BillingPolicy,
    *,
    waiting: BillingMessage | None,
) -> tuple[bool, list[OutboxMessage]]:
    """Ask for an auto-top-up of a locked account, and register ``waiting`` to be resumed after it.

    Every trigger sends the same ``auto_top_up`` message (reason
    ``low_balance``), whoever asks: the slot's key is the request.

    Returns (waiting registered, outbox messages).  At most
    ``policy.top_up_limit(account)`` per top-up period, a calendar month in
    UTC: the message key
    ``auto_top_up:{account}:{period}:{n}`` makes every trigger of one slot the
    same message, and a pending attempt counts.  Nothing waits on an
    attempt the provider reported ``processing`` (a bank debit can take
    days), and no new top-up goes out while one is processing, whatever
    its period: the caller goes on to past_due and its grace period instead.
    """
    if not account["auto_top_up_enabled"]:
        return False, []
    if await one(conn, _TOP_UP_PROCESSING, account_id=account["id"]) is not None:
        return False, []
    period = top_up_period(now)
    counts = await one(conn, _PERIOD_TOP_UPS, account_id=account["id"], period=period)
    assert counts is not None
    outbox: list[OutboxMessage] = []
    if counts["pending"] == 0:
        if counts["attempts"] >= policy.top_up_limit(account):
            return False, []
        key = f"auto_top_up:{account['id']}:{period}:{counts['attempts'] + 1}"
        key_row = await one(conn, _KEY_STATUS, key=key)
        if key_row is not None and key_row["status"] in ("completed", "failed", "dead"):
            # this slot's message already finished without an attempt (limit,
            # not configured) or failed for good: nothing to wait for
            return False, []
        if key_row is None:
            # one fixed reason per slot: every trigger of the slot must be the
            # same request, or the second would be an idempotency conflict
            top_up = AutoTopUpMessage(account_id=account["id"], idempotency_key=key, reason="low_balance")
            # reserve the slot's key with the message, so a trigger that runs
            # before the top-up is processed does not send it again
            relayed = OutboxMessage.of(top_up)
            await conn.execute(
                _RESERVE_KEY,
                {
                    "key": key,
                    "kind": top_up.actor_name,
                    "fingerprint": top_up.fingerprint(),
                    "account_id": account["id"],
                    # the completer re-sends the slot's message from here if it is lost
                    "lease_expires_at": now + policy.key_lease,
                    "request": relayed.request(),
                },
            )
            outbox.append(relayed)
    if waiting is not None:
        await conn.execute(
            _REGISTER_WAIT,
            {
                "key": waiting.idempotency_key,
                "account_id": account["id"],
                "actor_name": waiting.actor_name,
                "queue_name": waiting.queue_name,
                "kwargs": waiting.kwargs(),
            },
        )
    return waiting is not None, outbox


async def after_charge(
    conn: AsyncConnection,
    account: Mapping[Any, Any],
    balance_micros: int,
    now: datetime,
    policy: BillingPolicy,
) -> list[OutboxMessage]:
    """After a charge of a locked account: the top-up to send when the balance fell under its threshold."""
    threshold = account["auto_top_up_threshold_micros"]
    if account["auto_top_up_enabled"] and threshold is not None and balance_micros < threshold:
        _, outbox = await trigger_top_up(conn, account, now, policy, waiting=None)
        return outbox
    return []


async def resume_waiting(
    conn: AsyncConnection, account_id: str, now: datetime, policy: BillingPolicy
) -> list[OutboxMessage]:
    """Re-send, with their own keys, the messages that waited for this account's top-up (outbox rows to relay).

    Called in the transaction that settles the top-up (or, by the
    completer, for waits whose top-up is gone), under the account's lock.
    """
    rows = (
        (
            await conn.execute(
                _WAITS,
                {"account_id": account_id, "now": now, "lease_expires_at": now + policy.key_lease},
            )
        )
        .mappings()
        .all()
    )
    return [OutboxMessage(r["queue_name"], r["actor_name"], r["kwargs"]) for r in rows]
