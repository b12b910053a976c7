"""The account lock, the ledger, and the entitlement projection: what every kind shares.

Locks are always taken in the order idempotency key -> account ->
subscription -> API keys, so two messages never wait on each other in a
cycle (a deadlock that happens anyway is a transient error and is
retried).  :func:`lock_owner` is the account step for a message that names
a subscription or a key instead of its account.  Money is integer micros;
the ``balance_micros >= 0`` CHECK constraint is the last line of defence,
not the mechanism.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.errors import UnknownAccount, UnknownApiKey, UnknownSubscription

from ..sql import one, statement

__all__ = ["lock_account", "lock_owner", "post_ledger_entry", "project_entitlement"]

_LOCK_ACCOUNT = statement("lock_account")
_POST_LEDGER_ENTRY = statement("post_ledger_entry")
_UPSERT_ENTITLEMENT = statement("upsert_entitlement")
_SUBSCRIPTION_ACCOUNT = statement("subscription_owner")
_KEY_OWNER = statement("api_key_owner")


async def lock_account(conn: AsyncConnection, account_id: str) -> RowMapping:
    """Lock the account row (``FOR UPDATE``) and return it, with its auto-top-up settings.

    Raises:
      UnknownAccount: No such account.
    """
    account: RowMapping | None = await one(conn, _LOCK_ACCOUNT, account_id=account_id)
    if account is None:
        raise UnknownAccount(f"unknown account {account_id!r}")
    return account


async def lock_owner(
    conn: AsyncConnection, *, subscription_id: str | None = None, key_id: str | None = None
) -> tuple[RowMapping, str | None]:
    """Find the account that owns a subscription or an API key, and lock it (:func:`lock_account`).

    Pass exactly one of ``subscription_id`` and ``key_id``.  The owner is read
    without a lock first: an account id never changes, and the account's
    lock comes before the subscription's and the key's.

    Returns:
      (the locked account row, the subscription id: ``subscription_id``, or
      the key's subscription, None for a user key).

    Raises:
      UnknownSubscription, UnknownApiKey: No such subscription or key.
    """
    if key_id is not None:
        owner = await one(conn, _KEY_OWNER, key_id=key_id)
        if owner is None:
            raise UnknownApiKey(f"unknown API key {key_id!r}")
        return await lock_account(conn, owner["account_id"]), owner["subscription_id"]
    owner = await one(conn, _SUBSCRIPTION_ACCOUNT, subscription_id=subscription_id)
    if owner is None:
        raise UnknownSubscription(f"unknown subscription {subscription_id!r}")
    return await lock_account(conn, owner["account_id"]), subscription_id


async def post_ledger_entry(
    conn: AsyncConnection,
    *,
    account_id: str,
    amount_micros: int,
    kind: str,
    idempotency_key: str,
    now: datetime,
    subscription_id: str | None = None,
    period_start: datetime | None = None,
    top_up_attempt_id: str | None = None,
) -> int:
    """Append a ledger entry and change the balance by it, in one statement; returns the new balance.

    The ledger row and the balance change are applied together or not at
    all, and the balance is changed by SQL arithmetic, never written back
    from a value read into Python.  ``amount_micros`` is signed (a charge is
    negative).  A credit first collects the usage the account owes
    (``accounts.owed_micros``), as much as the new balance covers, as a
    ``usage_charge`` entry keyed ``owed:{idempotency_key}`` in the same
    statement; the balance returned is after that collection.  The caller
    holds the account's lock (:func:`lock_account`).  A repeated
    ``idempotency_key`` (unique) raises the driver's IntegrityError: callers
    decide a charge once, under the account's lock.
    """
    row = await one(
        conn,
        _POST_LEDGER_ENTRY,
        account_id=account_id,
        amount_micros=amount_micros,
        kind=kind,
        subscription_id=subscription_id,
        period_start=period_start,
        top_up_attempt_id=top_up_attempt_id,
        idempotency_key=idempotency_key,
        now=now,
    )
    assert row is not None
    return int(row["balance_micros"])


async def project_entitlement(
    conn: AsyncConnection,
    subscription: Mapping[Any, Any],
    *,
    status: str,
    current_period_end: datetime | None,
    now: datetime,
    grace_ends_at: datetime | None = None,
) -> None:
    """Write the entitlement projection row of the subscription's (account, plan) in the caller's transaction.

    Parameters:
      subscription: The subscription's ``id``, ``account_id`` and ``plan_id``
        (a locked subscription row, or those three keys).
      status: The subscription's new status; ``entitled`` is true while it is
        ``active`` or ``past_due`` (access continues through the grace
        period, until ``grace_ends_at``).
    """
    await conn.execute(
        _UPSERT_ENTITLEMENT,
        {
            "account_id": subscription["account_id"],
            "plan_id": subscription["plan_id"],
            "subscription_id": subscription["id"],
            "status": status,
            "entitled": status in ("active", "past_due"),
            "current_period_end": current_period_end,
            "grace_ends_at": grace_ends_at,
            "now": now,
        },
    )
