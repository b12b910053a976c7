"""Our side of ``billing reconcile``: the top-up attempts and credits to compare with the provider's charges.

Everything here is a SELECT (one REPEATABLE READ snapshot, no locks), except
:func:`claim_window_attempts`, which ``billing reconcile --settle`` alone
calls: it takes the window's pending attempts for the reconciler the way
:func:`db.deadlines.claim_due_attempts` does, without waiting for their
``reconcile_after``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.types import Text

from .deadlines import DueAttempt, due_attempt
from .sql import statement

__all__ = ["PROVIDER_KEY_PREFIX", "Credit", "OurAttempt", "our_attempts", "claim_window_attempts"]

#: Every provider idempotency key we send starts with this (``db.money.begin_top_up``:
#: ``billing-queue:top-up:{attempt id}``); a provider charge under another key is not ours.
PROVIDER_KEY_PREFIX = "billing-queue:top-up:"


@dataclass(frozen=True)
class Credit:
    """One ``top_up`` ledger entry.

    Attributes:
      ledger_entry_id: ``ledger_entries.id``.
      amount_micros: The credit, in micro-units of the account's currency (> 0).
      created_at: When it was posted (UTC).
    """

    ledger_entry_id: int
    amount_micros: int
    created_at: datetime


@dataclass(frozen=True)
class OurAttempt:
    """A top-up attempt as our database knows it, with the credits posted for it.

    Attributes:
      attempt_id: ``top_up_attempts.id``.
      account_id: The account charged.
      provider_key: The idempotency key the provider got (``billing-queue:top-up:...``).
      amount_micros: The amount asked for, in micro-units of ``currency``.
      currency: ISO 4217 code of the attempt (upper case).
      account_currency: The account's currency (its credits are in it).
      status: ``pending``, ``succeeded``, ``declined`` or ``failed``.
      provider_charge_id: The provider's id of the charge, when we stored one.
      provider_status: The last non-final answer (``processing``), else None.
      charge_lease_until: Until when a charge request may still be on its way (UTC), else None.
      created_at: When the attempt was recorded (UTC).
      credits: Its ``top_up`` ledger entries (at most one while the schema holds).
    """

    attempt_id: str
    account_id: str
    provider_key: str
    amount_micros: int
    currency: str
    account_currency: str
    status: str
    provider_charge_id: str | None
    provider_status: str | None
    charge_lease_until: datetime | None
    created_at: datetime
    credits: tuple[Credit, ...]


_OUR_ATTEMPTS = statement("our_attempts").bindparams(
    bindparam("keys", type_=ARRAY(Text)), bindparam("charge_ids", type_=ARRAY(Text))
)


def _attempt(row: RowMapping) -> OurAttempt:
    return OurAttempt(
        attempt_id=row["id"],
        account_id=row["account_id"],
        provider_key=row["provider_idempotency_key"],
        amount_micros=int(row["amount_micros"]),
        currency=row["currency"].strip().upper(),
        account_currency=row["account_currency"].strip().upper(),
        status=row["status"],
        provider_charge_id=row["provider_charge_id"],
        provider_status=row["provider_status"],
        charge_lease_until=row["charge_lease_until"],
        created_at=row["created_at"],
        credits=tuple(
            Credit(int(i), int(a), t)
            for i, a, t in zip(row["credit_ids"], row["credit_amounts"], row["credit_times"], strict=True)
        ),
    )


async def our_attempts(
    engine: AsyncEngine,
    *,
    since: datetime,
    until: datetime,
    provider_keys: Iterable[str] = (),
    charge_ids: Iterable[str] = (),
) -> list[OurAttempt]:
    """The attempts ``billing reconcile`` compares, read in one snapshot (SELECTs only).

    Those created in ``[since, until)``, those credited in it, and those the
    provider's charges point to (by our provider key or by the charge id we
    stored), whenever they were made.

    Parameters:
      since, until: The window (aware datetimes, UTC).
      provider_keys: Provider idempotency keys of the provider's charges.
      charge_ids: The provider's ids of those charges.

    Raises:
      sqlalchemy.exc.DBAPIError: PostgreSQL could not answer (the CLI says so in one line).
    """
    params = {"since": since, "until": until, "keys": list(provider_keys), "charge_ids": list(charge_ids)}
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            await conn.execute(text("SET TRANSACTION READ ONLY"))
            rows = (await conn.execute(_OUR_ATTEMPTS, params)).mappings().all()
    return [_attempt(r) for r in rows]


# The reconciler's lease, as in db.deadlines._DUE_ATTEMPTS, over one window's
# pending attempts whatever their reconcile_after; an attempt with a charge
# request possibly in flight (an unexpired charge lease) is still left alone.
_WINDOW_ATTEMPTS = statement("window_attempts")


async def claim_window_attempts(
    conn: AsyncConnection,
    *,
    since: datetime,
    until: datetime,
    now: datetime,
    relook_at: datetime,
    limit: int = 1000,
) -> list[DueAttempt]:
    """Take the pending attempts created in ``[since, until)`` for the reconciler, now (a write).

    Like :func:`db.deadlines.claim_due_attempts`, but ``reconcile_after`` is
    not waited for; attempts locked by another reconciler, or whose charge
    lease has not run out at ``now``, are skipped.  Run it on an autocommit
    connection: the update is the lease.

    Parameters:
      since, until, now, relook_at: UTC; ``relook_at`` is when a taken
        attempt is due again if it is not settled.
      limit: Most attempts taken.
    """
    rows = (
        (
            await conn.execute(
                _WINDOW_ATTEMPTS,
                {"since": since, "until": until, "now": now, "relook_at": relook_at, "limit": limit},
            )
        )
        .mappings()
        .all()
    )
    return [due_attempt(r) for r in rows]
