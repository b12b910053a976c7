"""The owners of the states that wait: the completer's and the reconciler's SQL.

Every state that waits has an owner that moves it forward and a deadline
(docs/lifecycle.md "States that wait"; the model is rocket-rides-atomic's completer,
which re-drives stalled keys, and its reaper, which ends abandoned ones):

* a key in ``processing`` past its lease (``lease_expires_at``): the
  completer re-sends it from ``request`` (what the database knows of the
  message) up to ``policy.max_redrives`` times, then ends it as ``failed``
  with a ``failed_messages`` row; a renewal claimed without a request is
  ended without one, since the scheduler sends its period again while it is due;
* a wait for funds (``funds_waits``, key ``waiting_for_funds``) with no live
  top-up behind it: the completer resumes it;
* a top-up attempt ``pending`` past ``reconcile_after``: the reconciler
  looks it up at the provider by our provider idempotency key and settles it
  (succeeded: the credit is posted once; declined or failed: the waits are
  released; processing: looked at again later).

Each statement takes what it works on with ``FOR UPDATE SKIP LOCKED`` (or a
lease column), so several schedulers can run these passes at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from . import money
from .errors import NoStoredRequest
from .money import BillingPolicy, Effect, OutboxMessage, TopUpIntent
from .periods import top_up_period
from .sql import statement

__all__ = [
    "LIVE_TOP_UP",
    "StaleKey",
    "DueAttempt",
    "due_attempt",
    "claim_stale_keys",
    "redrive_key",
    "end_key",
    "orphaned_wait_accounts",
    "release_orphaned_waits",
    "OWED_TOP_UP_DUE",
    "owed_accounts_without_top_up",
    "request_owed_top_up",
    "claim_due_attempts",
    "settle_attempt",
]

#: SQL predicate, over an account id ``{account}``: a top-up that a wait for
#: funds may wait on is still coming: a pending attempt that is not
#: ``processing`` at the provider, or a top-up message key in ``processing``
#: (reserved by the trigger, or claimed and before its attempt).  Used by the
#: completer and by ``billing audit`` (one rule, one place).
LIVE_TOP_UP = """(
    EXISTS (SELECT 1 FROM top_up_attempts lt WHERE lt.account_id = {account} AND lt.status = 'pending'
            AND lt.provider_status IS DISTINCT FROM 'processing')
    OR EXISTS (SELECT 1 FROM idempotency_keys lk WHERE lk.account_id = {account} AND lk.kind = 'auto_top_up'
               AND lk.status = 'processing')
)"""


@dataclass(frozen=True)
class StaleKey:
    """A ``processing`` key whose lease ran out."""

    key: str
    kind: str
    request: dict[str, Any] | None
    redrives: int
    account_id: str | None
    message_id: str | None


_STALE_KEYS = statement("stale_keys").columns(request=JSONB)


async def claim_stale_keys(conn: AsyncConnection, *, now: datetime, limit: int = 500) -> list[StaleKey]:
    """Lock the ``processing`` keys whose lease ran out at ``now`` (UTC), oldest first, skipping locked ones."""
    rows = (await conn.execute(_STALE_KEYS, {"now": now, "limit": limit})).mappings().all()
    return [
        StaleKey(r["key"], r["kind"], r["request"], int(r["redrives"]), r["account_id"], r["message_id"])
        for r in rows
    ]


_REDRIVE = statement("redrive_key")


async def redrive_key(
    conn: AsyncConnection, stale: StaleKey, *, now: datetime, policy: BillingPolicy
) -> OutboxMessage:
    """Re-send a stale key's message through the outbox (a new message id, the same key) and renew its lease.

    Raises:
      db.errors.NoStoredRequest: The key has no stored request (a ``ValueError``).
    """
    if stale.request is None:
        raise NoStoredRequest(f"key {stale.key!r} has no stored request to re-send")
    message = OutboxMessage(stale.request["queue_name"], stale.request["actor_name"], stale.request["kwargs"])
    await money.insert_outbox(conn, [message])
    await conn.execute(_REDRIVE, {"key": stale.key, "now": now, "lease_expires_at": now + policy.key_lease})
    return message


_END_KEY = statement("end_stale_key")


async def end_key(conn: AsyncConnection, stale: StaleKey, *, now: datetime, reason: str) -> None:
    """End a stale key as ``failed`` (a new delivery of the same key runs it again) and, unless it is a
    renewal the scheduler owns, record it in ``failed_messages`` for operators.

    Parameters:
      reason: Why, for ``last_error`` and the failure record.
    """
    await conn.execute(_END_KEY, {"key": stale.key, "now": now, "error": reason})
    if stale.kind == "renew" and stale.request is None:
        return  # the scheduler sends the period again while it is due
    request = stale.request or {}
    await money.record_failure(
        conn,
        message_id=stale.message_id or f"lease-expired:{stale.key}",
        actor_name=request.get("actor_name", stale.kind),
        queue_name=request.get("queue_name", "unknown"),
        kwargs=request.get("kwargs"),
        idempotency_key=stale.key,
        account_id=stale.account_id,
        error_type="lease_expired",
        error_message=reason,
        traceback=None,
        attempts=stale.redrives + 1,
    )


_ORPHANED_WAITS = text(
    f"""
    SELECT DISTINCT w.account_id FROM funds_waits w
    WHERE NOT {LIVE_TOP_UP.format(account="w.account_id")}
    LIMIT :limit
    """
)
_LOCK_ACCOUNT = statement("lock_account_for_waits")
_STILL_ORPHANED = text(f"SELECT NOT {LIVE_TOP_UP.format(account=':account_id')} AS orphaned")


async def orphaned_wait_accounts(conn: AsyncConnection, *, limit: int = 500) -> list[str]:
    """Accounts with waits for funds that no live top-up (:data:`LIVE_TOP_UP`) will ever resume."""
    return [r[0] for r in (await conn.execute(_ORPHANED_WAITS, {"limit": limit})).all()]


async def release_orphaned_waits(
    conn: AsyncConnection, account_id: str, *, now: datetime, policy: BillingPolicy
) -> list[OutboxMessage]:
    """Resume an account's waits if, under the account's lock, no live top-up is still coming.

    Returns the outbox messages written (empty when a top-up is live after all).
    """
    await conn.execute(_LOCK_ACCOUNT, {"account_id": account_id})
    if not (await conn.execute(_STILL_ORPHANED, {"account_id": account_id})).scalar_one():
        return []
    return await money.resume_waiting(conn, account_id, now, policy)


#: SQL predicate over an account row ``a``: it owes usage, its auto-top-up is
#: on, no top-up is coming or pending, and the top-up period ``:period``
#: (``YYYY-MM``) still has a slot for it: fewer attempts than its limit (its
#: own ``auto_top_up_max_per_period``, else ``:top_ups_per_period``; as
#: :meth:`db.money.BillingPolicy.top_up_limit`) and the next slot's message
#: not ended without an attempt (as :func:`db.money.trigger_top_up` skips it).
#: The completer asks for those accounts' top-up; ``billing audit`` flags the
#: ones still there past its deadline (one rule, one place).
OWED_TOP_UP_DUE = f"""(
    a.owed_micros > 0 AND a.auto_top_up_enabled
    AND NOT {LIVE_TOP_UP.format(account="a.id")}
    AND NOT EXISTS (SELECT 1 FROM top_up_attempts p WHERE p.account_id = a.id AND p.status = 'pending')
    AND (SELECT count(*) FROM top_up_attempts t WHERE t.account_id = a.id AND t.billing_period = :period)
        < COALESCE(NULLIF(a.auto_top_up_max_per_period, 0), :top_ups_per_period)
    AND NOT EXISTS (
        SELECT 1 FROM idempotency_keys s
        WHERE s.key = 'auto_top_up:' || a.id || ':' || :period || ':' || (
                  (SELECT count(*) FROM top_up_attempts t WHERE t.account_id = a.id
                     AND t.billing_period = :period) + 1)
          AND s.status IN ('completed', 'failed', 'dead'))
)"""

_OWED_WITHOUT_TOP_UP = text(
    f"""
    SELECT a.id FROM accounts a
    WHERE {OWED_TOP_UP_DUE}
    ORDER BY a.id LIMIT :limit
    """
)
_LOCK_OWED_ACCOUNT = text(
    f"""
    SELECT a.id, a.auto_top_up_enabled, a.auto_top_up_threshold_micros, a.auto_top_up_max_per_period
    FROM accounts a
    WHERE a.id = :account_id AND {OWED_TOP_UP_DUE}
    FOR UPDATE
    """
)


async def owed_accounts_without_top_up(
    conn: AsyncConnection, *, now: datetime, policy: BillingPolicy, limit: int = 500
) -> list[str]:
    """Accounts that owe usage and whose top-up can be asked for now (:data:`OWED_TOP_UP_DUE`).

    Only accounts with a slot left this month are returned, so those at
    their limit never crowd the others out of a pass's ``limit``.

    Owed usage is collected by the account's next credit.  With auto-top-up
    on, that credit is a top-up; one that was declined, or that the month's
    limit held back, leaves nothing to send the next one, and the debits that
    would trigger it have stopped (``has_credits`` is false).  The completer
    asks for it (:func:`request_owed_top_up`).
    """
    params = {"limit": limit, **_owed_params(now, policy)}
    return [r[0] for r in (await conn.execute(_OWED_WITHOUT_TOP_UP, params)).all()]


def _owed_params(now: datetime, policy: BillingPolicy) -> dict[str, Any]:
    return {"period": top_up_period(now), "top_ups_per_period": policy.top_ups_per_period}


async def request_owed_top_up(
    conn: AsyncConnection, account_id: str, *, now: datetime, policy: BillingPolicy
) -> list[OutboxMessage]:
    """Ask for the auto-top-up that collects an account's owed usage, under the account's lock.

    The same trigger as a debit's (:func:`db.money.trigger_top_up`): one
    message per slot of the top-up period, at most the account's limit a
    month, none while one is processing.  The messages are written to the
    outbox (the workers' sweeper relays them).

    Returns:
      The outbox messages written: none when, under the lock, the account no
      longer owes, a top-up is coming after all, or the month's limit is reached.
    """
    params = {"account_id": account_id, **_owed_params(now, policy)}
    account = (await conn.execute(_LOCK_OWED_ACCOUNT, params)).mappings().one_or_none()
    if account is None:
        return []
    _, outbox = await money.trigger_top_up(conn, account, now, policy, waiting=None)
    await money.insert_outbox(conn, outbox)
    return outbox


@dataclass(frozen=True)
class DueAttempt:
    """A pending top-up attempt taken by the reconciler."""

    intent: TopUpIntent
    message_key: str
    provider_charge_id: str | None
    charge_lease_until: datetime | None
    created_at: datetime


# The reconciler's lease is ``reconcile_after`` itself: an attempt taken here
# is not due again until ``relook_at``, so a crashed reconciler's attempts come
# back and two reconcilers never take the same one.
_DUE_ATTEMPTS = statement("due_attempts")


def due_attempt(row: RowMapping) -> DueAttempt:
    """A :class:`DueAttempt` from a ``top_up_attempts`` row (with ``message_idempotency_key``,
    ``provider_charge_id``, ``charge_lease_until`` and ``created_at``)."""
    return DueAttempt(
        intent=TopUpIntent.from_row(row),
        message_key=row["message_idempotency_key"],
        provider_charge_id=row["provider_charge_id"],
        charge_lease_until=row["charge_lease_until"],
        created_at=row["created_at"],
    )


async def claim_due_attempts(
    conn: AsyncConnection, *, now: datetime, relook_at: datetime, limit: int = 100
) -> list[DueAttempt]:
    """Take the pending attempts due for reconciliation at ``now`` (autocommit: the update is the lease).

    Attempts with a charge request possibly in flight (an unexpired charge
    lease) are left for later.

    Parameters:
      relook_at: When an attempt taken now is due again if it is not settled (UTC).
    """
    rows = (
        (await conn.execute(_DUE_ATTEMPTS, {"now": now, "relook_at": relook_at, "limit": limit}))
        .mappings()
        .all()
    )
    return [due_attempt(r) for r in rows]


_SETTLE_MESSAGE_KEY = statement("settle_message_key").bindparams(bindparam("result", type_=JSONB))


async def settle_attempt(
    conn: AsyncConnection,
    due: DueAttempt,
    *,
    state: str,
    charge_id: str | None,
    reason: str | None,
    looked_up_at: datetime,
    now: datetime,
    policy: BillingPolicy,
) -> Effect | None:
    """Record what the provider said of a due attempt, in one transaction, and complete its message's key.

    The settlement is :func:`db.money.finish_top_up` (the credit is posted
    once, under the attempt's row lock; the waits are resumed), skipped when
    a charge request went out after ``looked_up_at`` (the answer may be
    stale).  The top-up message's key gets the settled outcome unless it
    already has a final one, so a later delivery of it is a duplicate.

    Parameters:
      state: One of :data:`db.money.TOP_UP_STATES` but ``unknown``.
      looked_up_at: When the provider was asked (UTC).

    Returns:
      The settlement's effect (its outbox rows are written), or None when skipped.
    """
    effect = await money.finish_top_up(
        conn,
        due.intent,
        state=state,
        charge_id=charge_id,
        reason=reason,
        now=now,
        policy=policy,
        unless_charged_since=looked_up_at,
    )
    if effect is None:
        return None
    await money.insert_outbox(conn, effect.outbox)
    result = {**effect.stored_result(), "reconciled": True}
    await conn.execute(_SETTLE_MESSAGE_KEY, {"key": due.message_key, "result": result, "now": now})
    return effect
