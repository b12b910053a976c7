"""``record_usage``: metered usage debited from the prepaid balance, exactly once per event key.

The rule is one server-side function, ``billing_apply_usage_v2``
(``db/sql/functions/``): the balance covers what it can as a
``usage_charge`` ledger entry, the rest is owed (``accounts.owed_micros``)
and collected first by the account's next credit
(:func:`db.money.ledger.post_ledger_entry`).  Two paths run it:

* :func:`apply_record_usage`, one event in the caller's transaction (the
  Python path of :mod:`workers.transactions`);
* :func:`record_usage_batch`, the events of many accounts that arrived
  together, in a fixed number of statements whatever the number of accounts
  (``billing_record_usage_batch_v3``): the group commit of hot accounts, one
  account lock, one ledger entry and one balance update for all of an
  account's events.

Either way a debit that leaves the balance under the account's auto-top-up
threshold asks for a top-up (:func:`db.money.funds.after_charge`) in the
same transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.messages import RecordUsageMessage

from ..sql import statement
from .funds import after_charge
from .ledger import lock_account
from .policy import BillingPolicy, Effect, OutboxMessage

__all__ = ["apply_record_usage", "record_usage_batch", "usage_event"]

_APPLY_USAGE = statement("apply_usage", json_columns=("result",))
_RECORD_USAGE_BATCH = statement("record_usage_batch", json_columns=("r",))
_USAGE_EVENT = statement("usage_event")


def _columns(messages: list[RecordUsageMessage]) -> dict[str, list[Any]]:
    return {
        "keys": [m.idempotency_key for m in messages],
        "account_ids": [m.account_id for m in messages],
        "amounts": [m.amount_micros for m in messages],
        "meters": [m.meter for m in messages],
        "quantities": [m.quantity for m in messages],
        "occurred_ats": [m.occurred_at for m in messages],
    }


async def apply_record_usage(
    conn: AsyncConnection, message: RecordUsageMessage, now: datetime, policy: BillingPolicy
) -> Effect:
    """Debit one usage event of ``message.account_id`` (locked here), in the caller's transaction.

    Outcome ``usage_recorded`` with ``amount_micros``, ``charged_micros``
    (covered by the balance), ``owed_micros`` (the rest, now owed),
    ``balance_micros`` after the debit and ``ledger_entry_id`` (None when
    nothing was charged).  Amounts are integer micros.

    Raises:
      UnknownAccount: Permanent error.
    """
    account = await lock_account(conn, message.account_id)
    columns = {**_columns([message]), "account_ids": [account["id"]]}
    row = (await conn.execute(_APPLY_USAGE, {**columns, "now": now})).mappings().one()
    result = dict(row["result"])
    outbox = await after_charge(conn, account, int(result["balance_micros"]), now, policy)
    return Effect(result.pop("outcome"), result, outbox=outbox)


async def record_usage_batch(
    conn: AsyncConnection, messages: list[RecordUsageMessage], now: datetime, policy: BillingPolicy
) -> tuple[dict[str, dict[str, Any]], list[OutboxMessage]]:
    """Apply usage events of any accounts in one statement, grouped by account (``billing_record_usage_batch_v3``).

    Run it in a transaction the caller commits: the top-ups the debits ask
    for (:func:`db.money.funds.after_charge`, once per account) are written in
    it too.  The keys must have been claimed (:func:`db.money.keys.claim_keys`).

    Parameters:
      messages: Usage events with distinct idempotency keys.
      now: The effect's time (UTC).

    Returns:
      (key -> the stored outcome (``usage_recorded``), the first delivery's
      outcome with ``"duplicate": True``, or ``{"fallback": why}``
      (``unknown_account``, ``unclaimed``, or ``error`` with the ``error``):
      nothing was written for it, and :func:`apply_record_usage` is to handle
      it alone; the outbox messages of the top-ups asked for).
    """
    rows = (await conn.execute(_RECORD_USAGE_BATCH, {**_columns(messages), "now": now})).mappings().all()
    results: dict[str, dict[str, Any]] = {}
    balances: dict[str, tuple[dict[str, Any], int]] = {}
    for row in rows:
        r = row["r"]
        if r["fast"] == "applied":
            results[row["key"]] = r["result"]
            account = r["account"]
            balances[account["id"]] = (account, int(r["result"]["balance_micros"]))
        elif r["fast"] == "duplicate":
            results[row["key"]] = {**(r["result"] or {}), "duplicate": True}
        else:
            results[row["key"]] = {
                "fallback": r.get("why"),
                **({"error": r["error"], "sqlstate": r.get("sqlstate")} if "error" in r else {}),
            }
    outbox: list[OutboxMessage] = []
    for account, balance in balances.values():
        outbox += await after_charge(conn, account, balance, now, policy)
    return results, outbox


async def usage_event(conn: AsyncConnection, key: str) -> dict[str, Any] | None:
    """The applied usage event of idempotency key ``key`` (``usage_events`` row), or None."""
    row = (await conn.execute(_USAGE_EVENT, {"key": key})).mappings().one_or_none()
    return dict(row) if row is not None else None
