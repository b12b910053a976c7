"""``renew``: charge the next period, or enter dunning, or cancel.

One renewal implementation, two ways in.  The charge itself (the ledger
entry with the balance, the advanced period, the entitlement projection)
is the server-side function ``billing_renew_charge_v1``
(``db/sql/functions/``), which both paths run: :func:`apply_renew` calls it
once it has decided to charge, and the fast path's
``billing_renew_fast_v1`` calls it for a plain renewal.  The decisions
(already paid, not due, cancel at period end, a short balance, its top-up
and wait, dunning and the end of grace, catch-up) are made here only: the
fast path applies nothing but the plain case (an active subscription, the
period right after the paid one, enough balance, no top-up to trigger, no
catch-up) and returns every other message to :func:`apply_renew`.

Why the decisions stay in Python rather than all in PL/pgSQL: they share
the auto-top-up trigger and waits with ``subscribe`` (:mod:`.funds`), the
outbox messages and the :class:`BillingPolicy` (grace, dunning schedule,
leases) with the rest of the money path; moving them would write those a
second time in the other language.  The fast path's guard is the one rule
both sides know (what counts as plain), and a message it is unsure of
falls back, never the other way round.  The period arithmetic is
:func:`db.periods.period_bounds` here and ``billing_period_boundary`` in
SQL; a property test holds them equal.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.messages import RenewMessage, RevokeKeyMessage, renewal_key

from ..periods import period_bounds
from ..sql import one, statement
from .funds import after_charge, trigger_top_up
from .ledger import lock_owner, project_entitlement
from .policy import BillingPolicy, Effect, OutboxMessage

__all__ = ["apply_renew", "renew_fast_batch"]

_LOCK_SUBSCRIPTION = statement("lock_subscription")
_RENEW_CHARGE = statement("renew_charge")
_MARK_PAST_DUE = statement("mark_past_due")
_CANCEL_SUBSCRIPTION = statement("cancel_subscription")
_TOP_UP_PROCESSING = statement("top_up_processing")
_RENEW_FAST = statement("renew_fast", json_columns=("r",))


async def renew_fast_batch(
    conn: AsyncConnection, messages: list[RenewMessage], now: datetime
) -> dict[str, dict[str, Any]]:
    """Apply plain renewals in one statement: the fast path of :func:`apply_renew` (``billing_renew_fast_v1``).

    Run it on an autocommit connection: the statement is the transaction,
    so a batch costs one round trip and one commit.  Each message runs in
    its own subtransaction inside ``billing_renew_fast_v1``, under the same
    locks as the Python path (key, account, subscription); messages are
    taken in subscription order so concurrent batches lock in one order.
    The keys must have been claimed (:func:`claim_keys`) before.

    Parameters:
      messages: Renewals with distinct idempotency keys.
      now: The effect's time (UTC).

    Returns:
      Key -> the stored outcome (``renewed``), the first delivery's outcome
      with ``"duplicate": True``, or ``{"fallback": why}`` (``not_plain``,
      ``catch_up``, ``unknown_subscription``, or ``error`` with the
      ``error``): nothing was written for it, and :func:`apply_renew` in its
      own transaction is to handle it.
    """
    ordered = sorted(messages, key=lambda m: (m.subscription_id, m.idempotency_key))
    rows = (
        await conn.execute(
            _RENEW_FAST,
            {
                "keys": [m.idempotency_key for m in ordered],
                "subscription_ids": [m.subscription_id for m in ordered],
                "period_starts": [m.period_start for m in ordered],
                "period_start_isos": [m.period_start.isoformat() for m in ordered],
                "now": now,
            },
        )
    ).mappings()
    results: dict[str, dict[str, Any]] = {}
    for row in rows:
        r = row["r"]
        if r["fast"] == "applied":
            results[row["key"]] = r["result"]
        elif r["fast"] == "duplicate":
            results[row["key"]] = {**(r["result"] or {}), "duplicate": True}
        else:
            results[row["key"]] = {
                "fallback": r.get("why"),
                **({"error": r["error"]} if "error" in r else {}),
            }
    return results


async def _cancel(
    conn: AsyncConnection, subscription: RowMapping, now: datetime, reason: str
) -> list[OutboxMessage]:
    """Cancel a locked subscription, flip its entitlement, and return the ``revoke_key`` of its managed keys.

    The keys are revoked by the ``revoke_key`` message (SPEC), sent after
    commit through the outbox; ``source = user`` keys are never touched.
    """
    await conn.execute(_CANCEL_SUBSCRIPTION, {"id": subscription["id"], "reason": reason, "now": now})
    await project_entitlement(
        conn, subscription, status="canceled", current_period_end=subscription["current_period_end"], now=now
    )
    revoke = RevokeKeyMessage(
        subscription_id=subscription["id"],
        reason=reason,
        idempotency_key=f"revoke:{subscription['id']}:canceled",
    )
    return [OutboxMessage.of(revoke)]


async def _dunning(
    conn: AsyncConnection, sub: RowMapping, now: datetime, policy: BillingPolicy, base: dict[str, Any]
) -> Effect:
    """A renewal that cannot be paid: enter or continue ``past_due``, or cancel at the end of grace.

    Grace is measured from the first failed attempt (``past_due_since``), not
    from the period end, so a renewal that runs late (scheduler downtime,
    catch-up) still gets the whole grace period.  Retries are due at
    ``past_due_since + offset`` for each offset of
    :meth:`BillingPolicy.retry_offsets`; a failed attempt at or after the end
    of grace cancels the subscription and revokes its managed keys.  With a
    zero grace period that is the first failed attempt: the subscription
    cancels at once (``canceled_unpaid``), never ``past_due``.  While a
    top-up of the account is ``processing`` at the provider, the end of
    grace is held open (``policy.processing_poll`` at a time): the
    subscription stays past_due and entitled until the top-up settles.
    """
    since = sub["past_due_since"] if sub["status"] == "past_due" else now
    # a past_due subscription keeps the end of grace it was given
    grace_ends_at = sub["grace_ends_at"] if sub["status"] == "past_due" else since + policy.grace_period
    if now >= grace_ends_at:
        if await one(conn, _TOP_UP_PROCESSING, account_id=sub["account_id"]) is None:
            outbox = await _cancel(conn, sub, now, "unpaid_after_grace")
            return Effect("canceled_unpaid", {**base, "past_due_since": since.isoformat()}, outbox=outbox)
        # a top-up the provider is still processing (a bank debit) holds grace
        # open: entitled and past_due, retried each poll, until it settles
        grace_ends_at = now + policy.processing_poll
    attempts = sub["dunning_attempts"] + 1 if sub["status"] == "past_due" else 0
    next_retry_at = next(
        (since + o for o in policy.retry_offsets() if now < since + o < grace_ends_at), grace_ends_at
    )
    await conn.execute(
        _MARK_PAST_DUE,
        {
            "id": sub["id"],
            "since": since,
            "grace_ends_at": grace_ends_at,
            "attempts": attempts,
            "next_retry_at": next_retry_at,
            "now": now,
        },
    )
    await project_entitlement(
        conn,
        sub,
        status="past_due",
        current_period_end=sub["current_period_end"],
        grace_ends_at=grace_ends_at,
        now=now,
    )
    return Effect(
        "past_due",
        {
            **base,
            "past_due_since": since.isoformat(),
            "grace_ends_at": grace_ends_at.isoformat(),
            "next_retry_at": next_retry_at.isoformat(),
            "dunning_attempts": attempts,
        },
    )


async def apply_renew(
    conn: AsyncConnection, message: RenewMessage, now: datetime, policy: BillingPolicy
) -> Effect:
    """Charge the period that starts at ``message.period_start`` and advance the subscription.

    A period is charged at most once whatever the key: the subscription row
    is locked, the period must be the one right after the paid one, and the
    ledger has a unique index on (subscription, period start).

    Outcomes: ``renewed`` (also restores ``active`` for a past_due
    subscription, paying the unpaid period); ``already_paid`` (that period
    is paid); ``not_due`` (the period does not follow the paid one; the
    key is forgotten, so the same key sent when it is due charges then);
    ``already_canceled``; ``canceled`` (cancel at period end, at or after
    ``current_period_end``: keys revoked through ``revoke_key``);
    ``cancel_at_period_end_pending`` (the same, asked before period end:
    nothing happens and the key is forgotten); ``awaiting_top_up`` (short balance, an
    auto-top-up was requested and this message resumes after it);
    ``insufficient_funds_before_period_end`` (short balance, no top-up coming,
    asked before period end: nothing happens and the key is forgotten, so the
    paid period is never cut short by grace);
    ``past_due`` (short balance, no top-up possible or it was declined: grace
    period with dunning retries); ``canceled_unpaid`` (still short at the
    end of grace: canceled, managed keys revoked).

    Catch-up: when the next period is already due at ``now`` (the scheduler
    was down), its ``renew`` is written to the outbox with the scheduler's
    deterministic key, so missed periods are charged once each, in order.

    Raises:
      UnknownSubscription: Permanent error.
    """
    account, _ = await lock_owner(conn, subscription_id=message.subscription_id)
    sub = await one(conn, _LOCK_SUBSCRIPTION, subscription_id=message.subscription_id)
    assert sub is not None
    period_start = message.period_start
    base = {
        "subscription_id": sub["id"],
        "account_id": account["id"],
        "period_start": period_start.isoformat(),
    }
    if sub["status"] == "canceled":
        return Effect("already_canceled", base)
    if period_start < sub["current_period_end"]:
        return Effect("already_paid", {**base, "current_period_end": sub["current_period_end"].isoformat()})
    if period_start > sub["current_period_end"]:
        return Effect(
            "not_due",
            {**base, "current_period_end": sub["current_period_end"].isoformat()},
            key_status="forgotten",
        )
    if sub["cancel_at_period_end"]:
        if now < sub["current_period_end"]:
            # a cancel at period end happens at period end, never before: an
            # early renewal (lead time, or a producer ahead of time) decides
            # nothing, and the scheduler's due scan sends it again then
            return Effect(
                "cancel_at_period_end_pending",
                {**base, "current_period_end": sub["current_period_end"].isoformat()},
                key_status="forgotten",
            )
        return Effect("canceled", base, outbox=await _cancel(conn, sub, now, "canceled_at_period_end"))

    price = int(sub["price_micros"])
    if account["balance_micros"] < price:
        waiting, outbox = await trigger_top_up(conn, account, now, policy, waiting=message)
        if waiting:
            return Effect(
                "awaiting_top_up",
                {**base, "price_micros": price},
                key_status="waiting_for_funds",
                outbox=outbox,
            )
        if now < sub["current_period_end"]:
            # an early renewal (lead time, or a producer ahead of time) that cannot be paid
            # decides nothing: the paid period runs to its end, and past_due and its grace
            # start only then (the scheduler's due scan sends the period again at its end)
            return Effect(
                "insufficient_funds_before_period_end",
                {
                    **base,
                    "price_micros": price,
                    "balance_micros": int(account["balance_micros"]),
                    "current_period_end": sub["current_period_end"].isoformat(),
                },
                key_status="forgotten",
                outbox=outbox,
            )
        effect = await _dunning(conn, sub, now, policy, base)
        effect.result.update(price_micros=price, balance_micros=int(account["balance_micros"]))
        effect.outbox[:0] = outbox
        return effect

    index = sub["period_index"] + 1
    start, end = period_bounds(sub["billing_anchor"], sub["interval"], sub["interval_count"], index)
    charged = await one(
        conn,
        _RENEW_CHARGE,
        account_id=account["id"],
        subscription_id=sub["id"],
        plan_id=sub["plan_id"],
        price_micros=price,
        index=index,
        period_start=start,
        period_end=end,
        now=now,
    )
    assert charged is not None
    balance = int(charged["balance_micros"])
    outbox = await after_charge(conn, account, balance, now, policy)
    if end <= now:  # catch-up: the next period is due already
        outbox.append(
            OutboxMessage.of(
                RenewMessage(
                    subscription_id=sub["id"], period_start=end, idempotency_key=renewal_key(sub["id"], end)
                )
            )
        )
    return Effect(
        "renewed",
        {
            **base,
            "charged_micros": price,
            "balance_micros": balance,
            "current_period_end": end.isoformat(),
            **({"restored_from": "past_due"} if sub["status"] == "past_due" else {}),
        },
        outbox=outbox,
    )
