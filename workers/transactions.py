"""The transaction script of each message kind, registered in one place: :data:`TRANSACTION_SCRIPTS`.

A transaction script runs a claimed message's effect and returns its stored
outcome (``{"outcome": ..., ...}``).  Most kinds are one transaction
(:func:`one_transaction`): lock the key row (a concurrent delivery may have
finished it), run the kind's function of :mod:`db.money`, store the
outcome, commit, then the after-commit step (relay the outbox, deliver a new
key).  ``auto_top_up`` runs in phases around the provider call
(:mod:`workers.top_up`).

A new kind adds its model to :data:`tasks.messages.MESSAGE_MODELS`, its
function to :mod:`db.money`, and one line here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from db import money
from db.engine import transaction
from db.money import BillingPolicy, Effect
from tasks.messages import MESSAGE_MODELS, BillingMessage, RenewMessage, RevokeKeyMessage, SubscribeMessage

from . import metrics
from .top_up import top_up

if TYPE_CHECKING:
    from .billing import BillingService

__all__ = ["TRANSACTION_SCRIPTS", "TransactionScript", "EffectFunction", "one_transaction"]

#: ``script(service, message) -> stored outcome``; raises PermanentError or a transient error.
TransactionScript = Callable[["BillingService", BillingMessage], Awaitable[dict[str, Any]]]
#: ``apply(conn, message, now, policy) -> Effect``: a kind's effect inside the caller's transaction.
EffectFunction = Callable[[AsyncConnection, Any, datetime, BillingPolicy], Awaitable[Effect]]


def one_transaction(apply: EffectFunction) -> TransactionScript:
    """The transaction script of a kind whose whole effect is one transaction (``apply``).

    Crash points ``before_commit`` (effect written, transaction open) and
    ``after_commit`` (committed, outbox not relayed).
    """

    async def script(service: BillingService, message: BillingMessage) -> dict[str, Any]:
        key = message.idempotency_key
        async with transaction(service.engine) as conn:
            if (stored := await money.lock_key(conn, key)) is not None:
                return stored
            now = service.clock.now()
            effect = await apply(conn, message, now, service.policy)
            await money.record_effect(conn, key, effect, now)
            service.crash("before_commit", key)
        metrics.effect_committed(message.actor_name, effect)
        service.crash("after_commit", key)
        if "account_id" in effect.result:  # renew and revoke_key learn it from the database
            structlog.contextvars.bind_contextvars(account_id=effect.result["account_id"])
        await service.after_commit(effect)
        return effect.stored_result()

    return script


# The db.money functions are looked up at each call (not bound here), so
# each kind's function can be replaced where it is defined (tests do).


async def _subscribe(conn: AsyncConnection, m: SubscribeMessage, now: datetime, p: BillingPolicy) -> Effect:
    return await money.apply_subscribe(conn, m, now, p)


async def _renew(conn: AsyncConnection, m: RenewMessage, now: datetime, p: BillingPolicy) -> Effect:
    return await money.apply_renew(conn, m, now, p)


async def _revoke_key(conn: AsyncConnection, m: RevokeKeyMessage, now: datetime, p: BillingPolicy) -> Effect:
    return await money.apply_revoke_key(conn, m, now)


#: Actor name -> transaction script: the dispatch of :meth:`BillingService.apply`.
TRANSACTION_SCRIPTS: dict[str, TransactionScript] = {
    "subscribe": one_transaction(_subscribe),
    "renew": one_transaction(_renew),
    "revoke_key": one_transaction(_revoke_key),
    "auto_top_up": top_up,
}

if set(TRANSACTION_SCRIPTS) != set(MESSAGE_MODELS):  # pragma: no cover - caught by any test run
    raise RuntimeError(
        f"transaction scripts {sorted(TRANSACTION_SCRIPTS)} do not match the contract's kinds {sorted(MESSAGE_MODELS)}"
    )
