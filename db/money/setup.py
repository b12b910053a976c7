"""Operators' set-up: accounts, plans, user keys, credits, auto-top-up settings, cancel at period end, reissue.

Each runs in the caller's transaction and takes the money path's locks in
its order (account, then subscription, then keys).  A setting a constraint
refuses raises :class:`db.errors.SettingRefused`, converted by the
constraint's name.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.errors import ConfigurationError, IdempotencyConflict, UnknownSubscription

from .. import key_delivery
from ..errors import InvalidValue, KeyNotReissuable, refusing_settings
from ..sql import one, statement
from .api_keys import insert_api_key
from .ledger import lock_account, lock_owner, post_ledger_entry
from .policy import BillingPolicy, IssuedKey
from .revoke_key import REVOKE_ONE

__all__ = [
    "configure_auto_top_up",
    "create_account",
    "create_plan",
    "create_user_key",
    "credit_account",
    "reissue_managed_key",
    "set_cancel_at_period_end",
]

_INSERT_ACCOUNT = statement("insert_account")
_INSERT_PLAN = statement("insert_plan")
_CREDIT_EXISTS = statement("credit_exists")
_CONFIGURE_TOP_UP = statement("configure_top_up")
_SET_CANCEL_AT_PERIOD_END = statement("set_cancel_at_period_end")
_REISSUE_LOCK = statement("reissue_lock")
_KEY_FOR_REISSUE = statement("lock_api_key")
_LOCK_SUBSCRIPTION_STATUS = statement("lock_subscription_status")


async def create_account(
    conn: AsyncConnection,
    *,
    account_id: str,
    currency: str,
    balance_micros: int = 0,
    auto_top_up_threshold_micros: int | None = None,
    auto_top_up_amount_micros: int | None = None,
    payment_method_ref: str | None = None,
    auto_top_up_monthly_cap_micros: int | None = None,
    now: datetime,
) -> bool:
    """Open an account; an opening balance is an ``adjustment`` ledger entry (balance == ledger sum).

    Auto-top-up is enabled when amount, threshold and payment method are all given;
    ``auto_top_up_monthly_cap_micros`` optionally caps the top-ups of one calendar month.

    Returns:
      bool: False when the account already existed (nothing changed).

    Raises:
      db.errors.SettingRefused: A constraint refuses the settings (e.g. a
        monthly cap below one top-up: ``accounts_top_up_cap_covers_amount``).
    """
    enabled = None not in (auto_top_up_threshold_micros, auto_top_up_amount_micros, payment_method_ref)
    async with refusing_settings():
        row = await one(
            conn,
            _INSERT_ACCOUNT,
            id=account_id,
            currency=currency,
            enabled=enabled,
            threshold=auto_top_up_threshold_micros,
            amount=auto_top_up_amount_micros,
            payment_method_ref=payment_method_ref,
            monthly_cap=auto_top_up_monthly_cap_micros,
        )
    if row is None:
        return False
    if balance_micros:
        await post_ledger_entry(
            conn,
            account_id=account_id,
            amount_micros=balance_micros,
            kind="adjustment",
            idempotency_key=f"account-opening:{account_id}",
            now=now,
        )
    return True


async def create_plan(
    conn: AsyncConnection,
    *,
    plan_id: str,
    name: str,
    price_micros: int,
    currency: str,
    interval: str,
    interval_count: int = 1,
) -> bool:
    """Create a plan. Returns False when the plan already existed (nothing changed).

    Raises:
      db.errors.SettingRefused: A constraint refuses the plan (price, currency, interval).
    """
    async with refusing_settings():
        row = await one(
            conn,
            _INSERT_PLAN,
            id=plan_id,
            name=name,
            price_micros=price_micros,
            currency=currency,
            interval=interval,
            interval_count=interval_count,
        )
    return row is not None


async def create_user_key(conn: AsyncConnection, *, account_id: str, now: datetime) -> IssuedKey:
    """Issue a user-owned key (``source = user``): billing flows never revoke it."""
    await lock_account(conn, account_id)
    key_id, prefix, plaintext = await insert_api_key(
        conn, account_id=account_id, subscription_id=None, source="user", now=now
    )
    return IssuedKey(key_id, account_id, "", prefix, plaintext)


async def credit_account(
    conn: AsyncConnection, *, account_id: str, amount_micros: int, idempotency_key: str, now: datetime
) -> tuple[bool, int]:
    """An operator's manual credit (a payment received outside the provider): an ``adjustment`` ledger entry.

    Idempotent by ``idempotency_key`` (stored as ``credit:{key}``): a repeat
    with the same account and amount changes nothing; the same key with
    another account or amount is an idempotency conflict and changes nothing
    either.  Messages waiting for funds on the account are not resumed by a
    credit; the scheduler's next dunning retry picks up a past_due renewal.

    Parameters:
      amount_micros: Positive amount in micros of the account's currency.

    Returns:
      (applied, balance_micros): applied is False for a repeated key.

    Raises:
      UnknownAccount: No such account.
      IdempotencyConflict: The key credited another account or amount before.
      db.errors.InvalidValue: Amount not in 1..10**15 (a ``ValueError``).
    """
    if not 0 < amount_micros <= 10**15:
        raise InvalidValue("amount_micros must be between 1 and 10**15")
    account = await lock_account(conn, account_id)
    key = f"credit:{idempotency_key}"
    before = await one(conn, _CREDIT_EXISTS, key=key)
    if before is not None:
        if (before["account_id"], int(before["amount_micros"])) != (account_id, amount_micros):
            raise IdempotencyConflict(
                f"idempotency conflict: credit key {idempotency_key!r} already credited"
                f" {int(before['amount_micros'])} micros to account {before['account_id']!r};"
                f" nothing changed (this request: {amount_micros} micros to {account_id!r})"
            )
        return False, int(account["balance_micros"])
    balance = await post_ledger_entry(
        conn,
        account_id=account_id,
        amount_micros=amount_micros,
        kind="adjustment",
        idempotency_key=key,
        now=now,
    )
    return True, balance


async def configure_auto_top_up(
    conn: AsyncConnection,
    *,
    account_id: str,
    now: datetime,
    enabled: bool | None = None,
    threshold_micros: int | None = None,
    amount_micros: int | None = None,
    payment_method_ref: str | None = None,
    monthly_cap_micros: int | None = None,
    clear_monthly_cap: bool = False,
    max_per_period: int | None = None,
    clear_max_per_period: bool = False,
) -> None:
    """Change an account's auto-top-up settings (None leaves a setting as it is).

    Enabling resets the consecutive-decline count and clears the reason it
    was switched off.  ``max_per_period`` is the account's own limit of
    top-ups per calendar month (1..1000); ``clear_max_per_period`` goes back
    to the policy's (``BILLING_TOP_UPS_PER_PERIOD``).

    Raises:
      UnknownAccount: No such account.
      db.errors.SettingRefused: Enabling without amount, threshold and payment method
        (``accounts_top_up_configured``), a cap below the amount
        (``accounts_top_up_cap_covers_amount``), or an amount out of range.
    """
    await lock_account(conn, account_id)
    async with refusing_settings():
        await conn.execute(
            _CONFIGURE_TOP_UP,
            {
                "id": account_id,
                "enabled": enabled,
                "threshold": threshold_micros,
                "amount": amount_micros,
                "payment_method_ref": payment_method_ref,
                "monthly_cap": monthly_cap_micros,
                "clear_cap": clear_monthly_cap,
                "max_per_period": max_per_period,
                "clear_max": clear_max_per_period,
                "now": now,
            },
        )


async def set_cancel_at_period_end(
    conn: AsyncConnection, *, subscription_id: str, cancel: bool, now: datetime
) -> dict[str, Any]:
    """Ask for a subscription to end at its period end (``cancel=False`` takes the request back).

    At period end the renewal cancels it instead of charging, and its managed
    keys are revoked through ``revoke_key``.  Locks account then
    subscription, the order of the money path.

    Returns:
      ``{"subscription_id", "status", "cancel_at_period_end", "current_period_end"}``.

    Raises:
      UnknownSubscription: No such subscription, or it is canceled already.
    """
    await lock_owner(conn, subscription_id=subscription_id)
    row = await one(conn, _SET_CANCEL_AT_PERIOD_END, id=subscription_id, cancel=cancel, now=now)
    if row is None:
        raise UnknownSubscription(f"subscription {subscription_id!r} is canceled already")
    return {
        "subscription_id": row["id"],
        "status": row["status"],
        "cancel_at_period_end": cancel,
        "current_period_end": row["current_period_end"].isoformat(),
    }


async def reissue_managed_key(
    conn: AsyncConnection,
    *,
    key_id: str,
    idempotency_key: str,
    now: datetime,
    policy: BillingPolicy,
    reason: str = "reissued",
) -> dict[str, Any]:
    """Revoke an active managed key and issue its replacement, sealed and queued for delivery, in one transaction.

    Exactly once per ``idempotency_key``: a repeat with the same ``key_id``
    returns the first outcome (``"repeat": True``) and changes nothing.  The
    replacement belongs to the same account and subscription; the old key's
    pending delivery, if any, is superseded.  Locks: the idempotency key
    (advisory), the account, the subscription, the key.

    Returns:
      ``{"outcome": "reissued", "old_key_id", "key_id", "key_prefix", "delivery_id",
      "account_id", "subscription_id", "repeat"}``.

    Raises:
      UnknownApiKey: No such key.
      IdempotencyConflict: ``idempotency_key`` already reissued another key.
      KeyNotReissuable: A user key, a revoked key, or its subscription is canceled.
      tasks.errors.ConfigurationError: No public key to seal to (neither the account's nor the deployment's).
    """
    await conn.execute(_REISSUE_LOCK, {"key": idempotency_key})
    done = await key_delivery.reissue_of(conn, idempotency_key)
    if done is not None:
        if done["replaces_key_id"] != key_id:
            raise IdempotencyConflict(
                f"idempotency key {idempotency_key!r} already reissued key {done['replaces_key_id']!r}, not {key_id!r}"
            )
        return {
            "outcome": "reissued",
            "old_key_id": key_id,
            "key_id": done["key_id"],
            "key_prefix": done["prefix"],
            "delivery_id": done["delivery_id"],
            "account_id": done["account_id"],
            "subscription_id": done["subscription_id"],
            "repeat": True,
        }
    _, subscription_id = await lock_owner(conn, key_id=key_id)
    sub = None
    if subscription_id is not None:
        sub = await one(conn, _LOCK_SUBSCRIPTION_STATUS, subscription_id=subscription_id)
    old = await one(conn, _KEY_FOR_REISSUE, key_id=key_id)
    assert old is not None  # keys are never deleted
    if old["source"] != "managed":
        raise KeyNotReissuable(f"key {key_id!r} is a user key; only managed keys are reissued")
    if old["status"] != "active":
        raise KeyNotReissuable(f"key {key_id!r} is {old['status']}; only an active key is reissued")
    if sub is None or sub["status"] == "canceled":
        raise KeyNotReissuable(f"key {key_id!r} belongs to a canceled subscription")
    new_key_id, prefix, plaintext = await insert_api_key(
        conn, account_id=old["account_id"], subscription_id=old["subscription_id"], source="managed", now=now
    )
    await conn.execute(
        REVOKE_ONE, {"key_id": key_id, "now": now, "reason": f"{reason}: replaced by {new_key_id}"}
    )
    await key_delivery.supersede_pending(conn, key_id)
    delivery_id = await key_delivery.record_delivery(
        conn,
        key_id=new_key_id,
        account_id=old["account_id"],
        subscription_id=old["subscription_id"],
        prefix=prefix,
        plaintext=plaintext,
        now=now,
        default_public_key=policy.key_delivery_public_key,
        deadline=policy.key_delivery_deadline,
        reason="reissued",
        replaces_key_id=key_id,
        reissue_idempotency_key=idempotency_key,
    )
    if delivery_id is None:
        raise ConfigurationError(
            f"no public key to seal the new key of account {old['account_id']!r} to: set "
            "BILLING_KEY_DELIVERY_PUBLIC_KEY (or the account's, `billing keys set-recipient`)"
        )
    return {
        "outcome": "reissued",
        "old_key_id": key_id,
        "key_id": new_key_id,
        "key_prefix": prefix,
        "delivery_id": delivery_id,
        "account_id": old["account_id"],
        "subscription_id": old["subscription_id"],
        "repeat": False,
    }
