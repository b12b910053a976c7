"""``auto_top_up`` by recovery points: record the attempt, ask the provider, record its answer once.

Phase 1 (:func:`begin_top_up`) records the attempt and the provider's
idempotency key; phase 2's permit (:func:`take_charge_lease`) guards the
provider call; phase 3 (:func:`finish_top_up`, also the reconciler's
settlement) records the answer and resumes the waiting messages.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.messages import AutoTopUpMessage

from ..errors import InvalidValue
from ..periods import top_up_period
from ..sql import one, statement
from .funds import resume_waiting
from .ledger import lock_account, post_ledger_entry
from .policy import BillingPolicy, Effect, TopUpIntent

__all__ = ["TOP_UP_STATES", "begin_top_up", "finish_top_up", "take_charge_lease"]

_PERIOD_TOP_UPS = statement("period_top_ups")
_ATTEMPT_OF_MESSAGE = statement("attempt_of_message")
_INSERT_ATTEMPT = statement("insert_attempt")
_LOCK_ATTEMPT = statement("lock_attempt")
_ATTEMPT_SUCCEEDED = statement("attempt_succeeded")
_ATTEMPT_DECLINED = statement("attempt_declined")
_ATTEMPT_PROCESSING = statement("attempt_processing")
_DECLINES_RESET = statement("declines_reset")
_DECLINES_ADD = statement("declines_add")
_TAKE_CHARGE_LEASE = statement("take_charge_lease")
_RECONCILE_NOW = statement("reconcile_now")


async def begin_top_up(
    conn: AsyncConnection, message: AutoTopUpMessage, now: datetime, policy: BillingPolicy
) -> TopUpIntent | Effect:
    """Phase 1 of an auto-top-up: record the attempt and the provider's idempotency key.

    Returns the recorded :class:`TopUpIntent` (also when a previous delivery
    recorded it: the caller continues from the provider call), or a final
    :class:`Effect` when no attempt is allowed (``not_configured``,
    ``auto_top_up_disabled`` with the reason from the account's record,
    ``limit_reached`` for the period, ``cap_reached`` for the account's
    monthly cap, counting pending and succeeded attempts); waiting messages
    are then resumed so they finish.

    Raises:
      UnknownAccount: Permanent error.
    """
    existing = await one(conn, _ATTEMPT_OF_MESSAGE, key=message.idempotency_key)
    if existing is not None:
        return TopUpIntent.from_row(existing)
    account = await lock_account(conn, message.account_id)
    if not account["auto_top_up_enabled"] or not account["payment_method_ref"]:
        disabled = account["auto_top_up_disabled_reason"]
        return Effect(
            "auto_top_up_disabled" if disabled else "not_configured",
            {"account_id": account["id"], **({"reason": disabled} if disabled else {})},
            outbox=await resume_waiting(conn, account["id"], now, policy),
        )
    period = top_up_period(now)
    counts = await one(conn, _PERIOD_TOP_UPS, account_id=account["id"], period=period)
    assert counts is not None
    if counts["attempts"] >= policy.top_up_limit(account):
        return Effect(
            "limit_reached",
            {"account_id": account["id"], "period": period, "attempts": int(counts["attempts"])},
            outbox=await resume_waiting(conn, account["id"], now, policy),
        )
    amount = message.amount_micros or int(account["auto_top_up_amount_micros"])
    cap = account["auto_top_up_monthly_cap_micros"]
    if cap is not None and int(counts["committed_micros"]) + amount > cap:
        return Effect(
            "cap_reached",
            {
                "account_id": account["id"],
                "period": period,
                "monthly_cap_micros": int(cap),
                "topped_up_micros": int(counts["committed_micros"]),
                "amount_micros": amount,
            },
            outbox=await resume_waiting(conn, account["id"], now, policy),
        )
    attempt_id = "tua_" + uuid.uuid4().hex
    row = {
        "id": attempt_id,
        "account_id": account["id"],
        "key": message.idempotency_key,
        # derived from our row id (rocket-rides): a retry of this attempt
        # always sends the provider the same key
        "provider_key": f"billing-queue:top-up:{attempt_id}",
        "amount_micros": amount,
        "currency": account["currency"],
        "payment_method_ref": account["payment_method_ref"],
        "period": period,
        "reason": message.reason,
        "now": now,
        # the reconciler's deadline: past it the provider is asked what became of the charge
        "reconcile_after": now + policy.top_up_deadline,
    }
    await conn.execute(_INSERT_ATTEMPT, row)
    return TopUpIntent(
        attempt_id=attempt_id,
        account_id=account["id"],
        provider_idempotency_key=row["provider_key"],
        amount_micros=row["amount_micros"],
        currency=account["currency"].strip(),
        payment_method_ref=account["payment_method_ref"],
        status="pending",
    )


#: The provider's answers :func:`finish_top_up` records (``unknown``: no answer, nothing to record).
TOP_UP_STATES = ("succeeded", "declined", "processing", "failed", "unknown")


async def finish_top_up(
    conn: AsyncConnection,
    intent: TopUpIntent,
    *,
    state: str,
    charge_id: str | None,
    reason: str | None,
    now: datetime,
    policy: BillingPolicy,
    unless_charged_since: datetime | None = None,
) -> Effect | None:
    """Phase 3 of an auto-top-up (or the reconciler's settlement): record the provider's answer once.

    The ledger entry's key is derived from the attempt id, and the attempt
    row is locked, so a repeated phase 3 is a no-op that returns the stored
    state.  Waiting messages are resumed in the same transaction whatever
    the answer: after a success they re-run with the credited balance,
    otherwise they follow the past_due / grace rules.

    Parameters:
      state: ``succeeded`` (credit the ledger once), ``declined`` (the
        provider refused the card: counts towards switching auto-top-up
        off), ``failed`` (nothing was charged and nothing will be: the
        provider rejected the request, or reconciliation found no charge;
        counted like a decline), or ``processing`` (the provider has the
        charge but not its result: the attempt stays pending, owned by the
        reconciler, and the waits are released so renewals follow the
        past_due / grace rules meanwhile); or ``unknown`` (no answer: the
        stored state of a settled attempt, else ``top_up_reconciling``, the
        reconciler's turn, writing nothing).
      charge_id: The provider's id of the charge, when it gave one.
      reason: The decline code or the failure's reason.
      unless_charged_since: Reconciler only: do nothing (return None) if a
        charge request was sent at or after this time (a charge lease was
        taken after the provider was asked), since the answer may be stale.

    A decline or a failure adds one to the account's consecutive declines
    (a success resets them); at ``policy.disable_after_declines``
    auto-top-up switches itself off, with the reason and time in the
    account's record.

    Returns:
      Effect: ``topped_up``, ``declined``, ``top_up_failed``,
      ``top_up_processing`` or ``top_up_reconciling`` (those again for a
      repeat); None when skipped (``unless_charged_since``).

    Raises:
      db.errors.InvalidValue: An unknown ``state`` (a ``ValueError``).
    """
    if state not in TOP_UP_STATES:
        raise InvalidValue(f"unknown top-up state {state!r}")
    await lock_account(conn, intent.account_id)
    attempt = await one(conn, _LOCK_ATTEMPT, id=intent.attempt_id)
    assert attempt is not None
    base = {"attempt_id": intent.attempt_id, "amount_micros": intent.amount_micros}
    if attempt["status"] == "succeeded":
        return Effect("topped_up", {**base, "charge_id": attempt["provider_charge_id"]})
    if attempt["status"] == "declined":
        return Effect("declined", base)
    if attempt["status"] == "failed":
        return Effect("top_up_failed", base)
    if state == "unknown":
        return Effect("top_up_reconciling", {**base, "provider_status": attempt["provider_status"]})
    lease = attempt["charge_lease_until"]
    if unless_charged_since is not None and lease is not None and lease > unless_charged_since:
        return None
    if state == "succeeded":
        balance = await post_ledger_entry(
            conn,
            account_id=intent.account_id,
            amount_micros=intent.amount_micros,
            kind="top_up",
            top_up_attempt_id=intent.attempt_id,
            idempotency_key=f"top_up:{intent.attempt_id}",
            now=now,
        )
        await conn.execute(_ATTEMPT_SUCCEEDED, {"id": intent.attempt_id, "charge_id": charge_id, "now": now})
        await conn.execute(_DECLINES_RESET, {"id": intent.account_id})
        outbox = await resume_waiting(conn, intent.account_id, now, policy)
        return Effect("topped_up", {**base, "charge_id": charge_id, "balance_micros": balance}, outbox=outbox)
    if state == "processing":
        reconcile_after = now + policy.processing_poll
        await conn.execute(
            _ATTEMPT_PROCESSING,
            {"id": intent.attempt_id, "charge_id": charge_id, "reconcile_after": reconcile_after, "now": now},
        )
        outbox = await resume_waiting(conn, intent.account_id, now, policy)
        return Effect(
            "top_up_processing",
            {**base, "charge_id": charge_id, "reconcile_after": reconcile_after.isoformat()},
            outbox=outbox,
        )
    await conn.execute(
        _ATTEMPT_DECLINED,
        {
            "id": intent.attempt_id,
            "status": state,
            "reason": reason if state == "declined" else None,
            "error": reason if state == "failed" else None,
            "charge_id": charge_id,
            "now": now,
        },
    )
    outbox = await resume_waiting(conn, intent.account_id, now, policy)
    # a failure counts like a decline: a payment method that never answers (or a
    # request the provider always refuses) switches auto-top-up off after the same
    # number of tries, instead of keeping a renewal waiting top-up after top-up
    declines = await one(
        conn, _DECLINES_ADD, id=intent.account_id, limit=policy.disable_after_declines, now=now
    )
    assert declines is not None
    counts = {
        "consecutive_declines": int(declines["declines"]),
        "auto_top_up_disabled": bool(declines["disabled"]),
    }
    if state == "failed":
        return Effect("top_up_failed", {**base, "reason": reason, **counts}, outbox=outbox)
    return Effect("declined", {**base, "decline_reason": reason, **counts}, outbox=outbox)


async def take_charge_lease(
    conn: AsyncConnection, intent: TopUpIntent, *, now: datetime, key_window: timedelta, policy: BillingPolicy
) -> bool:
    """Phase 2's permit: may a charge request go to the provider now? (autocommit, one statement).

    Returns False, and hands the attempt to the reconciler at once, when the
    attempt is no longer pending, is ``processing`` at the provider, or is
    older than the provider's idempotency-key window (``key_window``): then
    the provider is asked what became of the charge instead of being sent
    it again (an operator's retry the next day must not charge twice).

    Parameters:
      key_window: How long the provider honours an idempotency key (Stripe: 24 h).
    """
    row = await one(
        conn,
        _TAKE_CHARGE_LEASE,
        id=intent.attempt_id,
        until=now + policy.charge_lease,
        now=now,
        window_start=now - key_window,
    )
    if row is None:
        await conn.execute(_RECONCILE_NOW, {"id": intent.attempt_id, "now": now})
        return False
    return True
