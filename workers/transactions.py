"""The transaction script of each message kind, registered in one place: :data:`TRANSACTION_SCRIPTS`.

A transaction script runs a claimed message's effect and returns its stored
outcome (``{"outcome": ..., ...}``).  Most kinds are one transaction
(:func:`one_transaction`): lock the key row (a concurrent delivery may have
finished it), run the kind's function of :mod:`db.money`, store the
outcome, commit, then the after-commit step (relay the outbox, deliver a new
key).  ``auto_top_up`` runs in phases around the provider call
(:mod:`workers.top_up`).

A new kind adds its model to :data:`tasks.messages.MESSAGE_MODELS`, its
module to :mod:`db.money` (``db/money/<kind>.py``, with its SQL in
``db/sql/<kind>.sql``), and its line to :data:`TRANSACTION_SCRIPTS`; the
package's ``__init__`` need not re-export it.
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
from db.money import record_usage as record_usage_kind
from db.money import renew as renew_kind
from db.money import revoke_key as revoke_key_kind
from db.money import subscribe as subscribe_kind
from tasks.messages import MESSAGE_MODELS, BillingMessage

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


# Each kind's function is looked up in its module at each call (not bound
# here), so it can be replaced where it is defined (tests do).
_subscribe: EffectFunction = lambda c, m, now, p: subscribe_kind.apply_subscribe(c, m, now, p)  # noqa: E731
_renew: EffectFunction = lambda c, m, now, p: renew_kind.apply_renew(c, m, now, p)  # noqa: E731
_revoke_key: EffectFunction = lambda c, m, now, p: revoke_key_kind.apply_revoke_key(c, m, now)  # noqa: E731
_record_usage: EffectFunction = lambda c, m, now, p: record_usage_kind.apply_record_usage(c, m, now, p)  # noqa: E731

#: Actor name -> transaction script: the dispatch of :meth:`BillingService.apply`.
TRANSACTION_SCRIPTS: dict[str, TransactionScript] = {
    "subscribe": one_transaction(_subscribe),
    "renew": one_transaction(_renew),
    "revoke_key": one_transaction(_revoke_key),
    "auto_top_up": top_up,
    "record_usage": one_transaction(_record_usage),
}

if set(TRANSACTION_SCRIPTS) != set(MESSAGE_MODELS):  # pragma: no cover - caught by any test run
    raise RuntimeError(
        f"transaction scripts {sorted(TRANSACTION_SCRIPTS)} do not match the contract's kinds {sorted(MESSAGE_MODELS)}"
    )
