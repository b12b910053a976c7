"""The message contract: one pydantic v2 model per Dramatiq actor.

Queue and actor names are part of the contract (SPEC "Messages"):

========== ==================== =========================================
actor      queue                arguments (keyword only)
========== ==================== =========================================
subscribe  ``billing``          account_id, plan_id, idempotency_key
renew      ``billing``          subscription_id, period_start, idempotency_key
auto_top_up ``billing.payments`` account_id, idempotency_key, amount_micros?, reason?
revoke_key ``billing``          key_id | subscription_id, reason, idempotency_key
record_usage ``billing.usage``  account_id, amount_micros, idempotency_key, meter?, quantity?, occurred_at?
========== ==================== =========================================

Money is an integer count of micro-units (1 USD = 1_000_000 micros).  Floats,
booleans, negative amounts and amounts over 10**15 are rejected here, at the
boundary, before anything is enqueued or applied.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from .errors import MessageValidationError

__all__ = [
    "MAX_AMOUNT_MICROS",
    "BILLING_QUEUE",
    "PAYMENTS_QUEUE",
    "BillingMessage",
    "SubscribeMessage",
    "RenewMessage",
    "AutoTopUpMessage",
    "RevokeKeyMessage",
    "RecordUsageMessage",
    "USAGE_QUEUE",
    "MESSAGE_MODELS",
    "QUEUE_OF_ACTOR",
    "validate_message",
    "check_json_text",
    "fingerprint",
    "renewal_key",
    "renewal_kwargs",
]

#: Largest amount accepted anywhere, in micros (SPEC "Money": 10^15 micros is
#: one billion units of a currency, far above any prepaid balance).
MAX_AMOUNT_MICROS = 10**15

#: Queue of subscribe, renew and revoke_key (SPEC "Messages").
BILLING_QUEUE = "billing"
#: Queue of auto_top_up: it waits on an outside provider, so operators can
#: give it its own workers (SPEC "Messages").
PAYMENTS_QUEUE = "billing.payments"
#: Queue of record_usage: metered events arrive by the thousand per second,
#: so operators can give them their own workers.
USAGE_QUEUE = "billing.usage"


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must contain printable characters only")
    return value


def _identifier(value: str) -> str:
    _printable(value)
    if value != value.strip() or any(c.isspace() for c in value):
        raise ValueError("must not contain whitespace")
    return value


def _utc_datetime(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() != UTC.utcoffset(None):
            raise ValueError("must be a UTC timestamp (offset +00:00 or Z)")
        return value
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 UTC timestamp string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError("must be an ISO 8601 UTC timestamp string") from exc
    if parsed.tzinfo is None or parsed.utcoffset() != UTC.utcoffset(None):
        raise ValueError("must be a UTC timestamp (offset +00:00 or Z)")
    return parsed.astimezone(UTC)


#: 1 to 255 printable characters (SPEC "Messages").
IdempotencyKey = Annotated[StrictStr, Field(min_length=1, max_length=255), AfterValidator(_printable)]
#: A caller-chosen id: 1 to 255 printable characters without whitespace.
Identifier = Annotated[StrictStr, Field(min_length=1, max_length=255), AfterValidator(_identifier)]
#: A positive amount in micros, at most 10**15; floats and booleans are rejected.
AmountMicros = Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT_MICROS)]
#: An ISO 8601 timestamp in UTC.
UtcTimestamp = Annotated[datetime, BeforeValidator(_utc_datetime)]
#: A meter name: 1 to 100 printable characters without whitespace (``llm.tokens``, ``sms.sent``).
Meter = Annotated[StrictStr, Field(min_length=1, max_length=100), AfterValidator(_identifier)]
#: A count of metered units (informational): an integer from 0 to 2**63 - 1 (PostgreSQL ``bigint``).
Quantity = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
#: A short free-text reason for operators (printable, at most 500 characters).
Reason = Annotated[StrictStr, Field(min_length=1, max_length=500), AfterValidator(_printable)]


class BillingMessage(BaseModel):
    """Base of the contract's messages: keyword arguments only, no extra fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Dramatiq actor name (part of the contract).
    actor_name: ClassVar[str]
    #: Dramatiq queue name (part of the contract).
    queue_name: ClassVar[str]

    idempotency_key: IdempotencyKey

    def kwargs(self) -> dict[str, Any]:
        """The message as the JSON-ready keyword arguments a producer sends."""
        return self.model_dump(mode="json", exclude_none=True)

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the canonical request (actor name and sorted arguments)."""
        return fingerprint(self.actor_name, self.kwargs())


class SubscribeMessage(BillingMessage):
    """Subscribe ``account_id`` to ``plan_id``, paying the first period from the balance."""

    actor_name: ClassVar[str] = "subscribe"
    queue_name: ClassVar[str] = BILLING_QUEUE

    account_id: Identifier
    plan_id: Identifier


class RenewMessage(BillingMessage):
    """Charge the period of ``subscription_id`` that starts at ``period_start`` (UTC)."""

    actor_name: ClassVar[str] = "renew"
    queue_name: ClassVar[str] = BILLING_QUEUE

    subscription_id: Identifier
    period_start: UtcTimestamp


class AutoTopUpMessage(BillingMessage):
    """Charge the account's payment method and credit the balance.

    ``amount_micros`` defaults to the account's configured top-up amount.
    """

    actor_name: ClassVar[str] = "auto_top_up"
    queue_name: ClassVar[str] = PAYMENTS_QUEUE

    account_id: Identifier
    amount_micros: AmountMicros | None = None
    reason: Reason | None = None


class RevokeKeyMessage(BillingMessage):
    """Revoke one key (``key_id``) or the managed keys of ``subscription_id``."""

    actor_name: ClassVar[str] = "revoke_key"
    queue_name: ClassVar[str] = BILLING_QUEUE

    key_id: Identifier | None = None
    subscription_id: Identifier | None = None
    reason: Reason

    @model_validator(mode="after")
    def _exactly_one_target(self) -> RevokeKeyMessage:
        if (self.key_id is None) == (self.subscription_id is None):
            raise ValueError("exactly one of key_id or subscription_id is required")
        return self


class RecordUsageMessage(BillingMessage):
    """Debit ``amount_micros`` of metered usage from the account's prepaid balance, once per event.

    ``idempotency_key`` is the producer's event id.  Usage has already
    happened when it is reported, so it is never refused for lack of funds:
    the balance covers what it can (a ``usage_charge`` ledger entry) and the
    rest is owed (``accounts.owed_micros``), collected first by the
    account's next credit.  ``meter``, ``quantity`` and ``occurred_at`` are
    informational, kept with the event.
    """

    actor_name: ClassVar[str] = "record_usage"
    queue_name: ClassVar[str] = USAGE_QUEUE

    account_id: Identifier
    amount_micros: AmountMicros
    meter: Meter | None = None
    quantity: Quantity | None = None
    occurred_at: UtcTimestamp | None = None


#: Actor name -> message model.
MESSAGE_MODELS: dict[str, type[BillingMessage]] = {
    m.actor_name: m
    for m in (SubscribeMessage, RenewMessage, AutoTopUpMessage, RevokeKeyMessage, RecordUsageMessage)
}
#: Actor name -> queue name.
QUEUE_OF_ACTOR: dict[str, str] = {name: m.queue_name for name, m in MESSAGE_MODELS.items()}


def fingerprint(actor_name: str, kwargs: dict[str, Any]) -> str:
    """SHA-256 hex digest of ``actor_name`` and the canonical JSON of ``kwargs``."""
    canonical = json.dumps([actor_name, kwargs], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "message"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unexpected field"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


#: Code points that no JSON text can carry as a character (RFC 8259 texts are
#: Unicode: a UTF-16 surrogate is not a character, yet ``"\\ud83c"`` decodes to
#: one, as JavaScript's ``JSON.stringify`` writes half an emoji) or that
#: PostgreSQL text and jsonb cannot hold (NUL).  Neither has a canonical form.
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def check_json_text(actor_name: str, kwargs: Any) -> None:
    """Refuse arguments that hold what no JSON text (RFC 8259) or PostgreSQL jsonb can: bad text, or no number.

    Looks at keys and values at any depth for a code point of
    :data:`_NOT_TEXT` (a lone UTF-16 surrogate, NUL) and for the non-finite
    numbers ``NaN`` and ``Infinity`` that Python's JSON decoder (and so
    Dramatiq's) accepts.  Runs before the signature check and the model:
    such a message has no canonical form to sign or to store.

    Parameters:
      actor_name: For the message only.
      kwargs: The decoded arguments (any JSON value).

    Raises:
      MessageValidationError: Names the first offending field and what it holds,
        e.g. ``account_id: a lone UTF-16 surrogate U+D83C``.
    """
    stack: list[tuple[str, Any]] = [("", kwargs)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and (bad := _NOT_TEXT.search(key)):
                    _refuse(actor_name, f"a field name ({ascii(key)[:60]})", _describe_char(bad.group()))
                stack.append((f"{path}.{key}" if path else str(key), item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str) and (bad := _NOT_TEXT.search(value)):
            _refuse(actor_name, path, _describe_char(bad.group()))
        elif isinstance(value, float) and not math.isfinite(value):
            _refuse(actor_name, path, f"{value}, which is not a JSON number")


def _describe_char(char: str) -> str:
    if char == "\x00":
        return "U+0000 (NUL), which PostgreSQL text cannot hold"
    return f"a lone UTF-16 surrogate U+{ord(char):04X} (send a surrogate pair's two halves together)"


def _refuse(actor_name: str, path: str, what: str) -> None:
    where = ascii(path)[1:-1][:100] or "message"
    raise MessageValidationError(f"invalid {ascii(actor_name)[1:-1][:100]} message: {where}: {what}")


def validate_message(actor_name: str, kwargs: Any, *, text_checked: bool = False) -> BillingMessage:
    """Validate keyword arguments against the contract of ``actor_name``.

    Parameters:
      actor_name: One of ``subscribe``, ``renew``, ``auto_top_up``, ``revoke_key``.
      kwargs: The message's keyword arguments (a dict decoded from JSON).
      text_checked: The caller already ran :func:`check_json_text` on them
        (the worker does, before the signature check): not walked twice.

    Returns:
      BillingMessage: The validated, immutable message.

    Raises:
      MessageValidationError: Unknown actor, not a dict, or a field breaks the
        contract; the message names every offending field.
    """
    model = MESSAGE_MODELS.get(actor_name)
    if model is None:
        raise MessageValidationError(f"unknown actor {actor_name!r}")
    if not isinstance(kwargs, dict):
        raise MessageValidationError("message arguments must be keyword arguments (a JSON object)")
    if not text_checked:
        check_json_text(actor_name, kwargs)
    try:
        return model.model_validate(kwargs)
    except ValidationError as exc:
        raise MessageValidationError(f"invalid {actor_name} message: {_describe(exc)}") from exc


def renewal_key(subscription_id: str, period_start: datetime, retry: int = 0) -> str:
    """The scheduler's deterministic idempotency key of a renewal (SPEC "Messages").

    ``renew:{subscription_id}:{period_start}`` with ``period_start`` in the
    message's own ISO 8601 UTC form (``2026-02-28T00:00:00Z``), so every
    scheduler pass, on any machine, sends the same key for one period.  A
    dunning retry of a past_due period (``retry`` >= 1) appends ``:retry:{n}``:
    its first attempt's key is completed with outcome ``past_due``, and a
    retry under that key would only return the stored outcome.

    Parameters:
      subscription_id: The subscription's id.
      period_start: Start of the period being paid for (aware datetime, UTC).
      retry: 0 for the renewal itself, n for the n-th dunning retry.

    Raises:
      ValueError: ``period_start`` is naive or not UTC, or ``retry`` < 0.
    """
    if retry < 0:
        raise ValueError("retry must be >= 0")
    start = _utc_datetime(period_start).astimezone(UTC)
    key = f"renew:{subscription_id}:{start.strftime('%Y-%m-%dT%H:%M:%S')}{_fraction(start)}Z"
    return key if retry == 0 else f"{key}:retry:{retry}"


def renewal_kwargs(subscription_id: str, period_start: datetime, retry: int = 0) -> dict[str, Any]:
    """The keyword arguments of the scheduler's ``renew`` for one period, without building a model.

    Exactly ``RenewMessage(subscription_id=..., period_start=...,
    idempotency_key=renewal_key(...)).kwargs()`` (a property test holds them
    equal), at a fraction of the cost: the scheduler sends 100,000 of them
    per pass from ids and timestamps it read from its own database.  The
    worker validates every message it receives anyway.

    Raises:
      ValueError: ``period_start`` is naive or not UTC, or ``retry`` < 0.
    """
    key = renewal_key(subscription_id, period_start, retry)
    start = period_start.astimezone(UTC)
    return {
        "idempotency_key": key,
        "subscription_id": subscription_id,
        "period_start": f"{start.strftime('%Y-%m-%dT%H:%M:%S')}{_fraction(start)}Z",
    }


def _fraction(value: datetime) -> str:
    return f".{value.microsecond:06d}" if value.microsecond else ""
