"""``subscribe``: charge the first period, create the subscription, issue its managed API key."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.errors import CurrencyMismatch, UnknownPlan
from tasks.messages import SubscribeMessage

from .. import key_delivery
from ..periods import period_bounds
from ..sql import one, statement
from .api_keys import insert_api_key
from .funds import after_charge, trigger_top_up
from .ledger import lock_account, post_ledger_entry, project_entitlement
from .policy import BillingPolicy, Effect, IssuedKey

__all__ = ["apply_subscribe"]

_PLAN = statement("plan")
_LIVE_SUBSCRIPTION = statement("live_subscription")
_INSERT_SUBSCRIPTION = statement("insert_subscription")


async def apply_subscribe(
    conn: AsyncConnection, message: SubscribeMessage, now: datetime, policy: BillingPolicy
) -> Effect:
    """Charge the first period, create the subscription and issue a managed API key.

    Outcomes: ``subscribed``; ``already_active`` (a non-canceled subscription
    to the plan exists: no charge); ``awaiting_top_up`` (short balance, an
    auto-top-up was requested and this message resumes after it);
    ``insufficient_funds`` (no charge, no retry).

    Raises:
      UnknownAccount, UnknownPlan, CurrencyMismatch: Permanent errors.
    """
    account = await lock_account(conn, message.account_id)
    plan = await one(conn, _PLAN, plan_id=message.plan_id)
    if plan is None:
        raise UnknownPlan(f"unknown plan {message.plan_id!r}")
    if plan["currency"] != account["currency"]:
        raise CurrencyMismatch(
            f"plan {plan['id']!r} is priced in {plan['currency']} but account {account['id']!r} is in {account['currency']}"
        )
    live = await one(conn, _LIVE_SUBSCRIPTION, account_id=account["id"], plan_id=plan["id"])
    if live is not None:
        return Effect("already_active", {"subscription_id": live["id"], "status": live["status"]})

    price = int(plan["price_micros"])
    if account["balance_micros"] < price:
        waiting, outbox = await trigger_top_up(conn, account, now, policy, waiting=message)
        if waiting:
            return Effect(
                "awaiting_top_up", {"price_micros": price}, key_status="waiting_for_funds", outbox=outbox
            )
        return Effect(
            "insufficient_funds",
            {"price_micros": price, "balance_micros": int(account["balance_micros"])},
            outbox=outbox,
        )

    anchor = now.replace(microsecond=0)
    start, end = period_bounds(anchor, plan["interval"], plan["interval_count"], 0)
    subscription_id = "sub_" + uuid.uuid4().hex
    await conn.execute(
        _INSERT_SUBSCRIPTION,
        {
            "id": subscription_id,
            "account_id": account["id"],
            "plan_id": plan["id"],
            "anchor": anchor,
            "start": start,
            "end": end,
            "key": message.idempotency_key,
            "now": now,
        },
    )
    # first activation and reactivation are charged under the subscribe
    # message's own key, so they can never share a key with a renewal
    balance = await post_ledger_entry(
        conn,
        account_id=account["id"],
        amount_micros=-price,
        kind="subscription_charge",
        subscription_id=subscription_id,
        period_start=start,
        idempotency_key=f"subscribe:{message.idempotency_key}",
        now=now,
    )
    key_id, prefix, plaintext = await insert_api_key(
        conn, account_id=account["id"], subscription_id=subscription_id, source="managed", now=now
    )
    # sealed to the subscriber's public key and queued in this transaction: durable
    delivery_id = await key_delivery.record_delivery(
        conn,
        key_id=key_id,
        account_id=account["id"],
        subscription_id=subscription_id,
        prefix=prefix,
        plaintext=plaintext,
        now=now,
        default_public_key=policy.key_delivery_public_key,
        deadline=policy.key_delivery_deadline,
    )
    subscription = {"id": subscription_id, "account_id": account["id"], "plan_id": plan["id"]}
    await project_entitlement(conn, subscription, status="active", current_period_end=end, now=now)
    outbox = await after_charge(conn, account, balance, now, policy)
    return Effect(
        "subscribed",
        {
            "subscription_id": subscription_id,
            "key_id": key_id,
            "key_prefix": prefix,
            "charged_micros": price,
            "balance_micros": balance,
            "current_period_end": end.isoformat(),
            **({"key_delivery_id": delivery_id} if delivery_id is not None else {}),
        },
        outbox=outbox,
        issued_key=(
            IssuedKey(key_id, account["id"], subscription_id, prefix, plaintext)
            if delivery_id is None
            else None
        ),
    )
