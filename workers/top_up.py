"""The ``auto_top_up`` transaction script: a loop over the attempt's recovery points.

A top-up calls the provider, which no database transaction can include, so
it runs as phases in the way of rocket-rides-atomic's ``atomic_phase``:
each phase moves the attempt from one recovery point to the next, and a
delivery that dies between two phases is redelivered and resumes at the
point the database recorded.  The provider's idempotency key is derived
from the attempt's row id, so a resumed attempt never charges twice.

Recovery points, in order::

    NEW --record intent--> STARTED --ask provider--> ANSWERED --record answer--> FINISHED

* ``NEW`` (nothing recorded for the message): phase 1 records the attempt
  and its provider key in one transaction (``top_up_attempts.recovery_point
  = 'started'``), or ends the message when no attempt is allowed (not
  configured, disabled, the period's limit or the monthly cap).
* ``STARTED`` (the attempt is recorded and pending): phase 2 asks the
  provider, under a charge lease and only within the provider's key window;
  its answer stays in memory (a crash here is resumed from ``STARTED``).
* ``ANSWERED``: phase 3 records the answer in one transaction: credit the
  ledger once, or count the decline, resume the messages waiting for funds
  (``recovery_point = 'finished'``).  With no answer (the lease was refused,
  or the provider is processing the charge) it records nothing and the
  reconciler owns the attempt.
* ``FINISHED`` (the attempt was settled by an earlier delivery or the
  reconciler): phase 3 returns the stored outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from db import money
from db.engine import transaction, translate_errors
from db.money import Effect, TopUpIntent
from tasks.errors import ProviderRejected
from tasks.messages import AutoTopUpMessage, BillingMessage

from . import metrics

if TYPE_CHECKING:
    from .billing import BillingService

__all__ = ["RecoveryPoint", "ProviderAnswer", "recovery_point_of", "top_up"]


class RecoveryPoint(StrEnum):
    """Where an attempt stands; ``STARTED`` and ``FINISHED`` are stored in ``top_up_attempts.recovery_point``."""

    NEW = "new"
    STARTED = "started"
    ANSWERED = "answered"
    FINISHED = "finished"


@dataclass(frozen=True)
class ProviderAnswer:
    """What the provider said in this delivery.

    Attributes:
      state: ``succeeded``, ``declined``, ``processing``, ``failed``, or
        ``unknown`` when no request went out (see :func:`db.money.finish_top_up`).
      charge_id: The provider's charge id, when it gave one.
      reason: The decline code or the failure's reason.
    """

    state: str = "unknown"
    charge_id: str | None = None
    reason: str | None = None


def recovery_point_of(intent: TopUpIntent) -> RecoveryPoint:
    """The recovery point a recorded attempt resumes at: its ``top_up_attempts.recovery_point``
    (``started`` until the provider's answer is recorded, then ``finished``)."""
    return RecoveryPoint(intent.recovery_point)


async def top_up(service: BillingService, message: BillingMessage) -> dict[str, Any]:
    """Run ``message`` (an :class:`AutoTopUpMessage`) from its recovery point to the end; returns the stored outcome.

    Raises:
      UnknownAccount: Permanent error (phase 1).
      ProviderUnavailable / ProviderTimeout / DatabaseUnavailable: Transient;
        the redelivery resumes at the recorded point.
    """
    assert isinstance(message, AutoTopUpMessage)
    key = message.idempotency_key
    point = RecoveryPoint.NEW
    intent: TopUpIntent | None = None
    answer = ProviderAnswer()
    while True:
        if point is RecoveryPoint.NEW:
            begun = await _record_intent(service, message)
            if not isinstance(begun, TopUpIntent):
                return begun  # no attempt allowed, or the key's stored outcome
            intent = begun
            service.crash("after_top_up_intent", key)
            point = recovery_point_of(intent)
        elif point is RecoveryPoint.STARTED:
            assert intent is not None
            answer = await _ask_provider(service, intent)
            service.crash("after_provider_charge", key)
            point = RecoveryPoint.ANSWERED
        else:  # ANSWERED, or FINISHED by an earlier delivery: record (or read back) the outcome
            assert intent is not None
            return await _record_answer(service, message, intent, answer)


async def _record_intent(service: BillingService, message: AutoTopUpMessage) -> TopUpIntent | dict[str, Any]:
    """Phase 1 (one transaction): the attempt and its provider key, or the message's final outcome."""
    key = message.idempotency_key
    async with transaction(service.engine) as conn:
        if (stored := await money.lock_key(conn, key)) is not None:
            return stored
        now = service.clock.now()
        begun = await money.begin_top_up(conn, message, now, service.policy)
        if isinstance(begun, Effect):
            await money.record_effect(conn, key, begun, now)
    if isinstance(begun, Effect):
        metrics.effect_committed(message.actor_name, begun)
        await service.after_commit(begun)
        return begun.stored_result()
    return begun


async def _ask_provider(service: BillingService, intent: TopUpIntent) -> ProviderAnswer:
    """Phase 2: the provider call, alone, under a charge lease (never past the provider's key window)."""
    async with translate_errors(), service.autocommit.connect() as conn:
        permitted = await money.take_charge_lease(
            conn,
            intent,
            now=service.clock.now(),
            key_window=service.provider.key_window,
            policy=service.policy,
        )
    if not permitted:  # settled meanwhile, past the key window, or processing: the reconciler's turn
        return ProviderAnswer()
    try:
        charge = await service.provider.charge(
            amount_micros=intent.amount_micros,
            currency=intent.currency,
            payment_method_ref=intent.payment_method_ref,
            idempotency_key=intent.provider_idempotency_key,
        )
    except ProviderRejected as exc:
        # the provider refused the request itself: nothing was charged, nothing will be
        return ProviderAnswer("failed", None, exc.message)
    return ProviderAnswer(charge.state, charge.charge_id, charge.decline_code)


async def _record_answer(
    service: BillingService, message: AutoTopUpMessage, intent: TopUpIntent, answer: ProviderAnswer
) -> dict[str, Any]:
    """Phase 3 (one transaction): the answer recorded once, the ledger credited, waiting work resumed."""
    key = message.idempotency_key
    async with transaction(service.engine) as conn:
        if (stored := await money.lock_key(conn, key)) is not None:
            return stored
        now = service.clock.now()
        # state "unknown": the stored state of a settled attempt, or the reconciler's turn
        effect = await money.finish_top_up(
            conn,
            intent,
            state=answer.state,
            charge_id=answer.charge_id,
            reason=answer.reason,
            now=now,
            policy=service.policy,
        )
        assert effect is not None
        await money.record_effect(conn, key, effect, now)
        service.crash("before_commit", key)
    metrics.effect_committed(message.actor_name, effect)
    service.crash("after_commit", key)
    await service.after_commit(effect)
    return effect.stored_result()
