"""The money path's rules and the values its transactions pass around.

:class:`BillingPolicy` holds the tunable rules; :class:`Effect` is one
message's outcome, with the follow-up messages (:class:`OutboxMessage`) and
the API key (:class:`IssuedKey`) it produced; :class:`ClaimedKey` and
:class:`TopUpIntent` are the states a delivery resumes from.  Money is
integer micros (1 USD = 1_000_000).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import uuid_utils
from sqlalchemy.engine import RowMapping

from tasks.messages import BillingMessage

__all__ = [
    "BillingPolicy",
    "ClaimedKey",
    "Effect",
    "IssuedKey",
    "OutboxMessage",
    "TopUpIntent",
    "message_request",
]


@dataclass(frozen=True)
class BillingPolicy:
    """Tunable rules of the money path.

    Attributes:
      top_ups_per_period: Auto-top-ups allowed per account per top-up period
        (a calendar month in UTC); SPEC: "at most one per account per billing
        period unless configured otherwise".  A pending attempt counts.
      disable_after_declines: Consecutive declined top-ups after which the
        account's auto-top-up switches itself off (0: never).
      grace_period: How long a subscription stays ``past_due`` after its
        first failed renewal before it is canceled.
      dunning_schedule: Offsets from the first failed renewal at which a
        past_due renewal is retried (the end of grace is always the last
        retry); the usual 1, 2 and 3 days of dunning.
    """

    top_ups_per_period: int = 1
    disable_after_declines: int = 3
    grace_period: timedelta = timedelta(days=3)
    dunning_schedule: tuple[timedelta, ...] = (timedelta(days=1), timedelta(days=2), timedelta(days=3))
    #: A key in ``processing`` belongs to the delivery that claimed it for
    #: this long; past it the completer re-drives or ends it.  15 minutes:
    #: longer than a message's whole retry schedule (8 retries, backoff up to
    #: 60 s) plus a dead worker's redelivery (heartbeat 30 s).
    key_lease: timedelta = timedelta(minutes=15)
    #: Times the completer re-sends a key whose lease ran out before it ends it as failed.
    max_redrives: int = 3
    #: A top-up attempt still pending this long after it was recorded is
    #: looked up at the provider by the reconciler (its message's retries are
    #: over by then).
    top_up_deadline: timedelta = timedelta(minutes=10)
    #: How often the reconciler looks again at an attempt the provider calls
    #: ``processing`` (bank debits take days).
    processing_poll: timedelta = timedelta(hours=1)
    #: Held before each charge request: the reconciler never settles an
    #: attempt as failed while a charge may still be on its way (longer than
    #: any provider call's timeout, 20 s for Stripe).
    charge_lease: timedelta = timedelta(minutes=2)
    #: The X25519 public key (base64) issued managed keys are sealed to when
    #: the account has none of its own (``api_key_recipients``); None: no
    #: durable delivery, the old pub/sub (see ``db/key_delivery.py``).
    key_delivery_public_key: str | None = None
    #: How long a sealed key delivery may wait for the consumer's acknowledgement
    #: before ``billing audit`` flags it.
    key_delivery_deadline: timedelta = timedelta(hours=24)

    def top_up_limit(self, account: Mapping[Any, Any]) -> int:
        """Auto-top-ups ``account`` may have per top-up period (a calendar month, UTC).

        Its own ``auto_top_up_max_per_period`` when set, else
        :attr:`top_ups_per_period`.  The one rule both the trigger
        (:func:`db.money.funds.trigger_top_up`) and the top-up itself
        (:func:`db.money.top_up.begin_top_up`) apply.
        """
        own = account.get("auto_top_up_max_per_period")
        return int(own) if own else self.top_ups_per_period

    def retry_offsets(self) -> list[timedelta]:
        """Dunning retry offsets within grace, ending with the end of grace (sorted, distinct)."""
        offsets = {o for o in self.dunning_schedule if timedelta(0) < o < self.grace_period}
        return sorted(offsets | {self.grace_period})


@dataclass(frozen=True)
class OutboxMessage:
    """A message to send after commit (transactional outbox).

    Attributes:
      message_id: The Dramatiq message id (a UUID string); a relay that runs
        twice sends the same id and the same idempotency key.
    """

    queue_name: str
    actor_name: str
    kwargs: dict[str, Any]
    message_id: str = field(default_factory=lambda: str(uuid_utils.uuid4()))

    @classmethod
    def of(cls, message: BillingMessage) -> OutboxMessage:
        """The outbox form of a validated message."""
        return cls(message.queue_name, message.actor_name, message.kwargs())

    def request(self) -> dict[str, Any]:
        """The form kept in ``idempotency_keys.request``, from which the completer re-sends a lost message."""
        return message_request(self.actor_name, self.queue_name, self.kwargs)


def message_request(actor_name: str, queue_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A message as ``idempotency_keys.request`` keeps it: ``{"actor_name", "queue_name", "kwargs"}``.

    (``resume_waiting``'s SQL builds the same object from a ``funds_waits`` row.)
    """
    return {"actor_name": actor_name, "queue_name": queue_name, "kwargs": kwargs}


@dataclass(frozen=True)
class IssuedKey:
    """The plaintext of a newly issued API key; it leaves the worker once and is never stored.

    An :class:`Effect` carries one only when no public key is configured for
    the account (the old pub/sub delivery); otherwise the key was sealed in
    the transaction (``db/key_delivery.py``) and the plaintext is gone.
    """

    key_id: str
    account_id: str
    subscription_id: str
    prefix: str
    plaintext: str = field(repr=False)


@dataclass
class Effect:
    """The result of one message's transaction.

    Attributes:
      outcome: A business outcome (``subscribed``, ``insufficient_funds``...).
      result: JSON-ready details stored with the idempotency key.
      key_status: ``completed``; ``waiting_for_funds`` (re-run when the
        top-up resumes it); or ``forgotten``: nothing was decided yet (a
        renewal asked before it can be decided), the key row is deleted so
        the same key asked again later is decided then.
      outbox: Messages written in the same transaction, relayed after commit.
      issued_key: A new API key to deliver after commit, if any.
    """

    outcome: str
    result: dict[str, Any] = field(default_factory=dict)
    key_status: str = "completed"
    outbox: list[OutboxMessage] = field(default_factory=list)
    issued_key: IssuedKey | None = None

    def stored_result(self) -> dict[str, Any]:
        """The JSON stored in ``idempotency_keys.result``."""
        return {"outcome": self.outcome, **self.result}


@dataclass(frozen=True)
class ClaimedKey:
    """State of an idempotency key after a delivery claimed it."""

    status: str
    result: dict[str, Any] | None
    attempts: int
    conflict: bool


@dataclass(frozen=True)
class TopUpIntent:
    """A recorded top-up attempt, ready for (or resuming at) the provider call."""

    attempt_id: str
    account_id: str
    provider_idempotency_key: str
    amount_micros: int
    currency: str
    payment_method_ref: str
    status: str
    #: ``top_up_attempts.recovery_point``: ``started`` until the result is recorded, then ``finished``.
    recovery_point: str = "started"

    @classmethod
    def from_row(cls, row: RowMapping) -> TopUpIntent:
        """The intent of a ``top_up_attempts`` row (``id``, ``account_id``, ``provider_idempotency_key``,
        ``amount_micros``, ``currency``, ``payment_method_ref``, ``status``, ``recovery_point``)."""
        return cls(
            attempt_id=row["id"],
            account_id=row["account_id"],
            provider_idempotency_key=row["provider_idempotency_key"],
            amount_micros=int(row["amount_micros"]),
            currency=row["currency"].strip(),
            payment_method_ref=row["payment_method_ref"],
            status=row["status"],
            recovery_point=row["recovery_point"],
        )
