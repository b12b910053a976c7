"""Every SQL statement that moves money, and the transactions built from them.

A reader finds here every statement that changes a balance, a ledger, a
subscription's paid period, an API key's status, a top-up attempt or the
entitlement projection.  Each ``apply_*`` function runs *inside* one caller's
transaction, after the caller locked the message's idempotency key row, and:

1. locks the account row (``SELECT ... FOR UPDATE``),
2. checks the balance inside that lock,
3. writes the ledger entry and the balance change in one statement,
4. returns an :class:`Effect` whose outcome the caller stores with the key.

Locks are always taken in the order idempotency key -> account ->
subscription -> API keys, so two messages never wait on each other in a
cycle (a deadlock that happens anyway is a transient error and is retried).

Money is integer micros (1 USD = 1_000_000).  The ``balance_micros >= 0``
CHECK constraint is the last line of defence, not the mechanism.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.errors import (
    ConfigurationError,
    CurrencyMismatch,
    IdempotencyConflict,
    UnknownAccount,
    UnknownApiKey,
    UnknownPlan,
    UnknownSubscription,
)
from tasks.messages import (
    AutoTopUpMessage,
    BillingMessage,
    RenewMessage,
    RevokeKeyMessage,
    SubscribeMessage,
    renewal_key,
)

from . import key_delivery
from .errors import InvalidValue, KeyNotReissuable, refusing_settings
from .periods import period_bounds, top_up_period

__all__ = [
    "BillingPolicy",
    "OutboxMessage",
    "IssuedKey",
    "Effect",
    "ClaimedKey",
    "TopUpIntent",
    "claim_key",
    "claim_keys",
    "KeyClaim",
    "renew_fast_batch",
    "lock_key",
    "record_effect",
    "fail_key",
    "record_failure",
    "redact",
    "apply_subscribe",
    "apply_renew",
    "apply_revoke_key",
    "begin_top_up",
    "finish_top_up",
    "resume_waiting",
    "message_request",
    "take_charge_lease",
    "TOP_UP_STATES",
    "create_account",
    "create_plan",
    "create_user_key",
    "credit_account",
    "configure_auto_top_up",
    "set_cancel_at_period_end",
    "insert_outbox",
    "delete_outbox",
    "claim_stale_outbox",
    "hash_api_key",
    "KeyNotReissuable",
    "reissue_managed_key",
]

# --------------------------------------------------------------------------- values


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
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))

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

    @classmethod
    def from_row(cls, row: RowMapping) -> TopUpIntent:
        """The intent of a ``top_up_attempts`` row (``id``, ``account_id``, ``provider_idempotency_key``,
        ``amount_micros``, ``currency``, ``payment_method_ref``, ``status``)."""
        return cls(
            attempt_id=row["id"],
            account_id=row["account_id"],
            provider_idempotency_key=row["provider_idempotency_key"],
            amount_micros=int(row["amount_micros"]),
            currency=row["currency"].strip(),
            payment_method_ref=row["payment_method_ref"],
            status=row["status"],
        )


# --------------------------------------------------------------------------- helpers


def _sql(statement: str, *, json_params: tuple[str, ...] = (), json_columns: tuple[str, ...] = ()) -> Any:
    clause: Any = text(statement)
    if json_params:
        clause = clause.bindparams(*(bindparam(name, type_=JSONB) for name in json_params))
    if json_columns:
        clause = clause.columns(**{name: JSONB for name in json_columns})
    return clause


def hash_api_key(plaintext: str) -> str:
    """SHA-256 hex digest of an API key (keys are 256-bit random, so a fast hash is enough)."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def _new_api_key() -> tuple[str, str]:
    prefix = "bq_" + secrets.token_hex(6)
    plaintext = f"{prefix}.{secrets.token_urlsafe(32)}"
    return prefix, plaintext


async def _insert_api_key(
    conn: AsyncConnection, *, account_id: str, subscription_id: str | None, source: str, now: datetime
) -> tuple[str, str, str]:
    """Insert a new active API key (only its hash is stored); returns (key id, prefix, plaintext)."""
    key_id = "key_" + uuid.uuid4().hex
    prefix, plaintext = _new_api_key()
    await conn.execute(
        _INSERT_API_KEY,
        {
            "id": key_id,
            "account_id": account_id,
            "subscription_id": subscription_id,
            "source": source,
            "prefix": prefix,
            "key_hash": hash_api_key(plaintext),
            "now": now,
        },
    )
    return key_id, prefix, plaintext


async def _one(conn: AsyncConnection, clause: Any, **params: Any) -> RowMapping | None:
    return (await conn.execute(clause, params)).mappings().one_or_none()


# --------------------------------------------------------------------------- idempotency keys

# A key that waits for funds is not delivered again by a re-send: the
# scheduler re-sends a due renewal every pass, and counting those as
# deliveries killed renewals that waited on a slow top-up.  Only the wait's
# owner (the top-up settling, or the completer) moves it on.
_CLAIM_KEY = _sql(
    """
    INSERT INTO idempotency_keys AS k (key, kind, fingerprint, status, attempts, account_id, message_id,
        lease_expires_at, request)
    VALUES (:key, :kind, :fingerprint, 'processing', 1, :account_id, :message_id, :lease_expires_at, :request)
    ON CONFLICT (key) DO UPDATE SET
        attempts = k.attempts + CASE
            WHEN k.fingerprint = EXCLUDED.fingerprint AND k.status NOT IN ('completed', 'waiting_for_funds')
            THEN 1 ELSE 0 END,
        message_id = CASE WHEN k.fingerprint = EXCLUDED.fingerprint AND k.status <> 'waiting_for_funds'
            THEN EXCLUDED.message_id ELSE k.message_id END,
        lease_expires_at = CASE WHEN k.fingerprint = EXCLUDED.fingerprint AND k.status = 'processing'
            THEN EXCLUDED.lease_expires_at ELSE k.lease_expires_at END,
        request = CASE WHEN k.fingerprint = EXCLUDED.fingerprint THEN COALESCE(EXCLUDED.request, k.request)
            ELSE k.request END,
        updated_at = now()
    RETURNING k.status, k.fingerprint, k.result, k.attempts
    """,
    json_params=("request",),
    json_columns=("result",),
)


async def claim_key(
    conn: AsyncConnection,
    *,
    key: str,
    kind: str,
    fingerprint: str,
    account_id: str | None,
    message_id: str,
    lease_expires_at: datetime,
    request: dict[str, Any] | None = None,
) -> ClaimedKey:
    """Record one delivery of a message under its idempotency key (autocommit, before the effect).

    Counting deliveries in a statement committed *before* the effect is what
    bounds a poison message: a worker killed mid-transaction loses its
    effect, not the count.  A repeated key returns the stored outcome.  A
    key ``waiting_for_funds`` is not counted and keeps waiting (the caller
    treats the delivery as a no-op).

    Parameters:
      lease_expires_at: Until when this delivery owns a ``processing`` key
        (UTC); past it the completer re-drives or ends the key.
      request: The message (``{"actor_name", "queue_name", "kwargs"}``) the
        completer re-sends if the delivery is lost.

    Returns:
      ClaimedKey: ``conflict`` is true when the key was used with other arguments.
    """
    row = await _one(
        conn,
        _CLAIM_KEY,
        key=key,
        kind=kind,
        fingerprint=fingerprint,
        account_id=account_id,
        message_id=message_id,
        lease_expires_at=lease_expires_at,
        request=request,
    )
    assert row is not None
    return ClaimedKey(
        status=row["status"],
        result=row["result"],
        attempts=row["attempts"],
        conflict=row["fingerprint"] != fingerprint,
    )


_CLAIM_KEYS = _sql(
    """
    INSERT INTO idempotency_keys AS k (key, kind, fingerprint, status, attempts, account_id, message_id,
        lease_expires_at)
    SELECT m.key, m.kind, m.fingerprint, 'processing', 1, m.account_id, m.message_id, :lease_expires_at
    FROM unnest(CAST(:keys AS text[]), CAST(:kinds AS text[]), CAST(:fingerprints AS text[]),
                CAST(:account_ids AS text[]), CAST(:message_ids AS text[]))
         AS m(key, kind, fingerprint, account_id, message_id)
    ORDER BY m.key
    ON CONFLICT (key) DO UPDATE SET
        attempts = k.attempts + CASE
            WHEN k.fingerprint = EXCLUDED.fingerprint AND k.status NOT IN ('completed', 'waiting_for_funds')
            THEN 1 ELSE 0 END,
        message_id = CASE WHEN k.fingerprint = EXCLUDED.fingerprint AND k.status <> 'waiting_for_funds'
            THEN EXCLUDED.message_id ELSE k.message_id END,
        lease_expires_at = CASE WHEN k.fingerprint = EXCLUDED.fingerprint AND k.status = 'processing'
            THEN EXCLUDED.lease_expires_at ELSE k.lease_expires_at END,
        updated_at = now()
    RETURNING k.key, k.status, k.fingerprint, k.result, k.attempts
    """,
    json_columns=("result",),
)


@dataclass(frozen=True)
class KeyClaim:
    """One delivery to claim in :func:`claim_keys`.

    Attributes:
      key: The message's idempotency key.
      kind: The actor name.
      fingerprint: The message's argument fingerprint.
      account_id: The account, when the message names it (None for ``renew``).
      message_id: Dramatiq's message id.
    """

    key: str
    kind: str
    fingerprint: str
    account_id: str | None
    message_id: str


async def claim_keys(
    conn: AsyncConnection, claims: list[KeyClaim], *, lease_expires_at: datetime
) -> dict[str, ClaimedKey]:
    """:func:`claim_key` for several deliveries in one statement (autocommit; group commit of claims).

    Rows are written in key order, so concurrent batches never wait on each
    other in a cycle.  No request is stored: these are renewals, which the
    scheduler sends again while their period is due.

    Parameters:
      claims: Deliveries with distinct keys (a key twice in one statement is
        refused by PostgreSQL's ON CONFLICT; the caller splits such batches).
      lease_expires_at: As for :func:`claim_key`.

    Returns:
      Key -> its claim, as :func:`claim_key` returns it.
    """
    rows = (
        await conn.execute(
            _CLAIM_KEYS,
            {
                "keys": [c.key for c in claims],
                "kinds": [c.kind for c in claims],
                "fingerprints": [c.fingerprint for c in claims],
                "account_ids": [c.account_id for c in claims],
                "message_ids": [c.message_id for c in claims],
                "lease_expires_at": lease_expires_at,
            },
        )
    ).mappings()
    fingerprints = {c.key: c.fingerprint for c in claims}
    return {
        row["key"]: ClaimedKey(
            status=row["status"],
            result=row["result"],
            attempts=row["attempts"],
            conflict=row["fingerprint"] != fingerprints[row["key"]],
        )
        for row in rows
    }


_RENEW_FAST = _sql(
    """
    SELECT m.key, billing_renew_fast(m.key, m.subscription_id, m.period_start, m.period_start_iso,
                                     CAST(:now AS timestamptz)) AS r
    FROM unnest(CAST(:keys AS text[]), CAST(:subscription_ids AS text[]),
                CAST(:period_starts AS timestamptz[]), CAST(:period_start_isos AS text[]))
         AS m(key, subscription_id, period_start, period_start_iso)
    """,
    json_columns=("r",),
)


async def renew_fast_batch(
    conn: AsyncConnection, messages: list[RenewMessage], now: datetime
) -> dict[str, dict[str, Any]]:
    """Apply plain renewals in one statement: the fast path of :func:`apply_renew` (migration 0005).

    Run it on an autocommit connection: the statement is the transaction,
    so a batch costs one round trip and one commit.  Each message runs in
    its own subtransaction inside ``billing_renew_fast``, under the same
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


_LOCK_KEY = _sql(
    "SELECT status, result FROM idempotency_keys WHERE key = :key FOR UPDATE", json_columns=("result",)
)


async def lock_key(conn: AsyncConnection, key: str) -> dict[str, Any] | None:
    """Lock the key row for this transaction (serializes concurrent deliveries of one key).

    Returns:
      The stored outcome, marked ``duplicate``, when another delivery
      completed the key meanwhile, or marked ``waiting`` when another
      delivery left it waiting for funds (the top-up resumes it); None when
      this transaction is to apply the effect.
    """
    row = await _one(conn, _LOCK_KEY, key=key)
    if row is not None and row["status"] == "completed":
        return {**(row["result"] or {}), "duplicate": True}
    if row is not None and row["status"] == "waiting_for_funds":
        return {**(row["result"] or {}), "waiting": True}
    return None


_COMPLETE_KEY = _sql(
    """
    UPDATE idempotency_keys SET status = :status, result = :result, last_error = NULL, updated_at = :now,
        account_id = COALESCE(account_id, :account_id),
        completed_at = CASE WHEN :status = 'completed' THEN CAST(:now AS timestamptz) ELSE NULL END
    WHERE key = :key
    """,
    json_params=("result",),
)
_FORGET_KEY = text("DELETE FROM idempotency_keys WHERE key = :key")


async def record_effect(conn: AsyncConnection, key: str, effect: Effect, now: datetime) -> None:
    """Write the effect's follow-up messages to the outbox and store its outcome with its key.

    Both in the effect's transaction: a follow-up is never sent for an
    effect that did not commit, nor lost for one that did.

    The key row learns its account from the effect when the message did not
    name it (``renew``, ``revoke_key``), so operators can find it by account.
    """
    await insert_outbox(conn, effect.outbox)
    if effect.key_status == "forgotten":
        # asked too early (not due yet, cancel before period end): nothing was
        # decided, so the same key asked again later is decided then
        await conn.execute(_FORGET_KEY, {"key": key})
        return
    await conn.execute(
        _COMPLETE_KEY,
        {
            "key": key,
            "status": effect.key_status,
            "result": effect.stored_result(),
            "account_id": effect.result.get("account_id"),
            "now": now,
        },
    )


_FAIL_KEY = text(
    """
    UPDATE idempotency_keys SET status = CASE WHEN status = 'completed' THEN status ELSE :status END,
        last_error = :error, updated_at = now()
    WHERE key = :key AND fingerprint = :fingerprint
    """
)


async def fail_key(conn: AsyncConnection, key: str, fingerprint: str, status: str, error: str) -> None:
    """Mark a key ``failed`` (permanent error; a new delivery re-runs it) or ``dead`` (poison)."""
    await conn.execute(
        _FAIL_KEY, {"key": key, "fingerprint": fingerprint, "status": status, "error": error[:2000]}
    )


_RECORD_FAILURE = _sql(
    """
    INSERT INTO failed_messages AS f (message_id, actor_name, queue_name, kwargs, idempotency_key, account_id,
        error_type, error_message, traceback, attempts, status)
    VALUES (:message_id, :actor_name, :queue_name, :kwargs, :idempotency_key, :account_id,
        :error_type, :error_message, :traceback, :attempts, 'dead')
    ON CONFLICT (message_id) DO UPDATE SET
        error_type = EXCLUDED.error_type, error_message = EXCLUDED.error_message, traceback = EXCLUDED.traceback,
        attempts = GREATEST(f.attempts + 1, EXCLUDED.attempts), status = 'dead', last_seen_at = now()
    """,
    json_params=("kwargs",),
)


#: Argument names stored as ``[redacted]`` in ``failed_messages`` (case-insensitive, anywhere in the name).
SECRET_ARGUMENT = re.compile(
    r"secret|password|passwd|token|api_?key|authorization|card|cvc|cvv|iban|signature", re.I
)


def redact(value: Any) -> Any:
    """A copy of ``value`` (JSON-like) with every secret-looking key's value replaced by ``[redacted]``.

    Code points PostgreSQL cannot store in text or jsonb are escaped (see
    :func:`_no_nul`), and the numbers jsonb has no form for (``NaN``,
    ``Infinity``, which Python's JSON decoder accepts) are written as those
    words: a malformed message may carry either.
    """
    if isinstance(value, dict):
        return {
            _no_nul(str(k)): "[redacted]" if SECRET_ARGUMENT.search(str(k)) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _no_nul(value)
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)  # "NaN", "Infinity" or "-Infinity"
    return value


#: What PostgreSQL text and jsonb cannot hold: NUL, and UTF-16 surrogates
#: (a lone one decodes from JSON's ``"\\ud83c"``, which JavaScript writes for half an emoji).
_NOT_STORABLE = re.compile("[\x00\ud800-\udfff]")


def _no_nul(text: str) -> str:
    """``text`` with NUL written as the four characters ``\\x00`` and a surrogate as the six ``\\udXXX``."""
    return _NOT_STORABLE.sub(lambda m: "\\x00" if m.group() == "\x00" else f"\\u{ord(m.group()):04x}", text)


async def record_failure(
    conn: AsyncConnection,
    *,
    message_id: str,
    actor_name: str,
    queue_name: str,
    kwargs: Any,
    idempotency_key: str | None,
    account_id: str | None,
    error_type: str,
    error_message: str,
    traceback: str | None,
    attempts: int,
) -> None:
    """Record a message that failed for good, for operators (``failed_messages``).

    Arguments whose name suggests a secret (:data:`SECRET_ARGUMENT`) are
    stored as ``[redacted]``: the contract's messages carry none, but a
    malformed message may.  A failure recorded again (a retry that failed)
    updates its row, counts the attempt and sets it back to ``dead``.
    """
    await conn.execute(
        _RECORD_FAILURE,
        {
            "message_id": _no_nul(message_id),
            "actor_name": _no_nul(actor_name)[:255],
            "queue_name": _no_nul(queue_name)[:255],
            "kwargs": redact(kwargs),
            "idempotency_key": _no_nul(idempotency_key) if idempotency_key is not None else None,
            "account_id": _no_nul(account_id) if account_id is not None else None,
            "error_type": error_type,
            "error_message": _no_nul(error_message)[:4000],
            "traceback": _no_nul(traceback)[-8000:] if traceback else None,
            "attempts": attempts,
        },
    )


# --------------------------------------------------------------------------- accounts and the ledger

_LOCK_ACCOUNT = text(
    """
    SELECT id, currency, balance_micros, auto_top_up_enabled, auto_top_up_threshold_micros,
           auto_top_up_amount_micros, payment_method_ref, auto_top_up_monthly_cap_micros,
           auto_top_up_disabled_reason
    FROM accounts WHERE id = :account_id FOR UPDATE
    """
)


async def _lock_account(conn: AsyncConnection, account_id: str) -> RowMapping:
    account = await _one(conn, _LOCK_ACCOUNT, account_id=account_id)
    if account is None:
        raise UnknownAccount(f"unknown account {account_id!r}")
    return account


# One statement: the ledger row and the balance change are applied together
# or not at all; the balance is changed by SQL arithmetic, never written back
# from a value read into Python.
_POST_LEDGER_ENTRY = text(
    """
    WITH entry AS (
        INSERT INTO ledger_entries (account_id, amount_micros, kind, subscription_id, period_start,
                                    top_up_attempt_id, idempotency_key, created_at)
        VALUES (:account_id, :amount_micros, :kind, :subscription_id, :period_start,
                :top_up_attempt_id, :idempotency_key, :now)
        RETURNING account_id, amount_micros
    )
    UPDATE accounts a SET balance_micros = a.balance_micros + entry.amount_micros, updated_at = :now
    FROM entry WHERE a.id = entry.account_id
    RETURNING a.balance_micros
    """
)


async def _post_ledger_entry(
    conn: AsyncConnection,
    *,
    account_id: str,
    amount_micros: int,
    kind: str,
    idempotency_key: str,
    now: datetime,
    subscription_id: str | None = None,
    period_start: datetime | None = None,
    top_up_attempt_id: str | None = None,
) -> int:
    row = await _one(
        conn,
        _POST_LEDGER_ENTRY,
        account_id=account_id,
        amount_micros=amount_micros,
        kind=kind,
        subscription_id=subscription_id,
        period_start=period_start,
        top_up_attempt_id=top_up_attempt_id,
        idempotency_key=idempotency_key,
        now=now,
    )
    assert row is not None
    return int(row["balance_micros"])


_UPSERT_ENTITLEMENT = text(
    """
    INSERT INTO entitlements (account_id, plan_id, subscription_id, status, entitled, current_period_end,
        grace_ends_at, updated_at)
    VALUES (:account_id, :plan_id, :subscription_id, :status, :entitled, :current_period_end, :grace_ends_at, :now)
    ON CONFLICT (account_id, plan_id) DO UPDATE SET
        subscription_id = EXCLUDED.subscription_id, status = EXCLUDED.status, entitled = EXCLUDED.entitled,
        current_period_end = EXCLUDED.current_period_end, grace_ends_at = EXCLUDED.grace_ends_at,
        updated_at = EXCLUDED.updated_at
    """
)


async def _project_entitlement(
    conn: AsyncConnection,
    *,
    account_id: str,
    plan_id: str,
    subscription_id: str,
    status: str,
    current_period_end: datetime | None,
    now: datetime,
    grace_ends_at: datetime | None = None,
) -> None:
    """Write the entitlement projection row of (account, plan) in the caller's transaction.

    ``entitled`` is true while the subscription is ``active`` or ``past_due``
    (access continues through the grace period, until ``grace_ends_at``).
    """
    await conn.execute(
        _UPSERT_ENTITLEMENT,
        {
            "account_id": account_id,
            "plan_id": plan_id,
            "subscription_id": subscription_id,
            "status": status,
            "entitled": status in ("active", "past_due"),
            "current_period_end": current_period_end,
            "grace_ends_at": grace_ends_at,
            "now": now,
        },
    )


# --------------------------------------------------------------------------- auto-top-up triggers

_PERIOD_TOP_UPS = text(
    """
    SELECT count(*) AS attempts, count(*) FILTER (WHERE status = 'pending') AS pending,
           COALESCE(sum(amount_micros) FILTER (WHERE status IN ('pending', 'succeeded')), 0)::bigint AS committed_micros
    FROM top_up_attempts WHERE account_id = :account_id AND billing_period = :period
    """
)
_KEY_STATUS = text("SELECT status FROM idempotency_keys WHERE key = :key")
# a top-up the provider is processing (a bank debit), any period: nothing waits on
# it, no other is sent meanwhile, and it holds the end of grace open
_TOP_UP_PROCESSING = text(
    """
    SELECT id FROM top_up_attempts
    WHERE account_id = :account_id AND status = 'pending' AND provider_status = 'processing' LIMIT 1
    """
)
_RESERVE_KEY = _sql(
    """
    INSERT INTO idempotency_keys (key, kind, fingerprint, status, attempts, account_id, lease_expires_at, request)
    VALUES (:key, :kind, :fingerprint, 'processing', 0, :account_id, :lease_expires_at, :request)
    ON CONFLICT (key) DO NOTHING
    """,
    json_params=("request",),
)
_REGISTER_WAIT = _sql(
    """
    INSERT INTO funds_waits (idempotency_key, account_id, actor_name, queue_name, kwargs)
    VALUES (:key, :account_id, :actor_name, :queue_name, :kwargs)
    ON CONFLICT (idempotency_key) DO NOTHING
    """,
    json_params=("kwargs",),
)


async def _trigger_top_up(
    conn: AsyncConnection,
    account: RowMapping,
    now: datetime,
    policy: BillingPolicy,
    *,
    reason: str,
    waiting: BillingMessage | None,
) -> tuple[bool, list[OutboxMessage]]:
    """Ask for an auto-top-up of a locked account, and register ``waiting`` to be resumed after it.

    Returns (waiting registered, outbox messages).  At most
    ``policy.top_ups_per_period`` per top-up period: the message key
    ``auto_top_up:{account}:{period}:{n}`` makes every trigger of one slot the
    same message, and a pending attempt counts.  Nothing waits on an
    attempt the provider reported ``processing`` (a bank debit can take
    days), and no new top-up goes out while one is processing, whatever
    its period: the caller goes on to past_due and its grace period instead.
    """
    if not account["auto_top_up_enabled"]:
        return False, []
    if await _one(conn, _TOP_UP_PROCESSING, account_id=account["id"]) is not None:
        return False, []
    period = top_up_period(now)
    counts = await _one(conn, _PERIOD_TOP_UPS, account_id=account["id"], period=period)
    assert counts is not None
    outbox: list[OutboxMessage] = []
    if counts["pending"] == 0:
        if counts["attempts"] >= policy.top_ups_per_period:
            return False, []
        key = f"auto_top_up:{account['id']}:{period}:{counts['attempts'] + 1}"
        key_row = await _one(conn, _KEY_STATUS, key=key)
        if key_row is not None and key_row["status"] in ("completed", "failed", "dead"):
            # this slot's message already finished without an attempt (limit,
            # not configured) or failed for good: nothing to wait for
            return False, []
        if key_row is None:
            # one fixed reason per slot: every trigger of the slot must be the
            # same request, or the second would be an idempotency conflict
            top_up = AutoTopUpMessage(account_id=account["id"], idempotency_key=key, reason="low_balance")
            # reserve the slot's key with the message, so a trigger that runs
            # before the top-up is processed does not send it again
            relayed = OutboxMessage.of(top_up)
            await conn.execute(
                _RESERVE_KEY,
                {
                    "key": key,
                    "kind": top_up.actor_name,
                    "fingerprint": top_up.fingerprint(),
                    "account_id": account["id"],
                    # the completer re-sends the slot's message from here if it is lost
                    "lease_expires_at": now + policy.key_lease,
                    "request": relayed.request(),
                },
            )
            outbox.append(relayed)
    if waiting is not None:
        await conn.execute(
            _REGISTER_WAIT,
            {
                "key": waiting.idempotency_key,
                "account_id": account["id"],
                "actor_name": waiting.actor_name,
                "queue_name": waiting.queue_name,
                "kwargs": waiting.kwargs(),
            },
        )
    return waiting is not None, outbox


async def _after_charge(
    conn: AsyncConnection, account: RowMapping, balance_micros: int, now: datetime, policy: BillingPolicy
) -> list[OutboxMessage]:
    threshold = account["auto_top_up_threshold_micros"]
    if account["auto_top_up_enabled"] and threshold is not None and balance_micros < threshold:
        _, outbox = await _trigger_top_up(conn, account, now, policy, reason="below_threshold", waiting=None)
        return outbox
    return []


# --------------------------------------------------------------------------- subscribe

_PLAN = text("SELECT id, price_micros, currency, interval, interval_count FROM plans WHERE id = :plan_id")
_LIVE_SUBSCRIPTION = text(
    "SELECT id, status FROM subscriptions WHERE account_id = :account_id AND plan_id = :plan_id AND status <> 'canceled'"
)
_INSERT_SUBSCRIPTION = text(
    """
    INSERT INTO subscriptions (id, account_id, plan_id, status, billing_anchor, period_index,
        current_period_start, current_period_end, created_by_key, created_at, updated_at)
    VALUES (:id, :account_id, :plan_id, 'active', :anchor, 0, :start, :end, :key, :now, :now)
    """
)
_INSERT_API_KEY = text(
    """
    INSERT INTO api_keys (id, account_id, subscription_id, source, prefix, key_hash, status, created_at)
    VALUES (:id, :account_id, :subscription_id, :source, :prefix, :key_hash, 'active', :now)
    """
)


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
    account = await _lock_account(conn, message.account_id)
    plan = await _one(conn, _PLAN, plan_id=message.plan_id)
    if plan is None:
        raise UnknownPlan(f"unknown plan {message.plan_id!r}")
    if plan["currency"] != account["currency"]:
        raise CurrencyMismatch(
            f"plan {plan['id']!r} is priced in {plan['currency']} but account {account['id']!r} is in {account['currency']}"
        )
    live = await _one(conn, _LIVE_SUBSCRIPTION, account_id=account["id"], plan_id=plan["id"])
    if live is not None:
        return Effect("already_active", {"subscription_id": live["id"], "status": live["status"]})

    price = int(plan["price_micros"])
    if account["balance_micros"] < price:
        waiting, outbox = await _trigger_top_up(
            conn, account, now, policy, reason=f"subscribe:{plan['id']}", waiting=message
        )
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
    balance = await _post_ledger_entry(
        conn,
        account_id=account["id"],
        amount_micros=-price,
        kind="subscription_charge",
        subscription_id=subscription_id,
        period_start=start,
        idempotency_key=f"subscribe:{message.idempotency_key}",
        now=now,
    )
    key_id, prefix, plaintext = await _insert_api_key(
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
    await _project_entitlement(
        conn,
        account_id=account["id"],
        plan_id=plan["id"],
        subscription_id=subscription_id,
        status="active",
        current_period_end=end,
        now=now,
    )
    outbox = await _after_charge(conn, account, balance, now, policy)
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


# --------------------------------------------------------------------------- renew

_SUBSCRIPTION_ACCOUNT = text("SELECT account_id FROM subscriptions WHERE id = :subscription_id")
_LOCK_SUBSCRIPTION = text(
    """
    SELECT s.id, s.account_id, s.plan_id, s.status, s.billing_anchor, s.period_index, s.current_period_start,
           s.current_period_end, s.cancel_at_period_end, s.past_due_since, s.grace_ends_at, s.dunning_attempts,
           p.price_micros, p.currency, p.interval, p.interval_count
    FROM subscriptions s JOIN plans p ON p.id = s.plan_id
    WHERE s.id = :subscription_id FOR UPDATE OF s
    """
)
_ADVANCE_PERIOD = text(
    """
    UPDATE subscriptions SET status = 'active', period_index = :index, current_period_start = :start,
        current_period_end = :end, past_due_since = NULL, grace_ends_at = NULL, dunning_attempts = 0,
        next_retry_at = NULL, updated_at = :now
    WHERE id = :id
    """
)
_MARK_PAST_DUE = text(
    """
    UPDATE subscriptions SET status = 'past_due', past_due_since = :since, grace_ends_at = :grace_ends_at,
        dunning_attempts = :attempts, next_retry_at = :next_retry_at, updated_at = :now
    WHERE id = :id
    """
)
_CANCEL_SUBSCRIPTION = text(
    """
    UPDATE subscriptions SET status = 'canceled', canceled_at = :now, cancel_reason = :reason,
        next_retry_at = NULL, updated_at = :now
    WHERE id = :id AND status <> 'canceled'
    """
)


async def _cancel(
    conn: AsyncConnection, subscription: RowMapping, now: datetime, reason: str
) -> list[OutboxMessage]:
    """Cancel a locked subscription, flip its entitlement, and return the ``revoke_key`` of its managed keys.

    The keys are revoked by the ``revoke_key`` message (SPEC), sent after
    commit through the outbox; ``source = user`` keys are never touched.
    """
    await conn.execute(_CANCEL_SUBSCRIPTION, {"id": subscription["id"], "reason": reason, "now": now})
    await _project_entitlement(
        conn,
        account_id=subscription["account_id"],
        plan_id=subscription["plan_id"],
        subscription_id=subscription["id"],
        status="canceled",
        current_period_end=subscription["current_period_end"],
        now=now,
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
        if await _one(conn, _TOP_UP_PROCESSING, account_id=sub["account_id"]) is None:
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
    await _project_entitlement(
        conn,
        account_id=sub["account_id"],
        plan_id=sub["plan_id"],
        subscription_id=sub["id"],
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
    owner = await _one(conn, _SUBSCRIPTION_ACCOUNT, subscription_id=message.subscription_id)
    if owner is None:
        raise UnknownSubscription(f"unknown subscription {message.subscription_id!r}")
    account = await _lock_account(conn, owner["account_id"])
    sub = await _one(conn, _LOCK_SUBSCRIPTION, subscription_id=message.subscription_id)
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
        waiting, outbox = await _trigger_top_up(
            conn, account, now, policy, reason=f"renew:{sub['id']}", waiting=message
        )
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
    balance = await _post_ledger_entry(
        conn,
        account_id=account["id"],
        amount_micros=-price,
        kind="renewal_charge",
        subscription_id=sub["id"],
        period_start=start,
        idempotency_key=f"renewal:{sub['id']}:{start.isoformat()}",
        now=now,
    )
    await conn.execute(
        _ADVANCE_PERIOD, {"id": sub["id"], "index": index, "start": start, "end": end, "now": now}
    )
    await _project_entitlement(
        conn,
        account_id=account["id"],
        plan_id=sub["plan_id"],
        subscription_id=sub["id"],
        status="active",
        current_period_end=end,
        now=now,
    )
    outbox = await _after_charge(conn, account, balance, now, policy)
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


# --------------------------------------------------------------------------- revoke_key

_KEY_OWNER = text("SELECT account_id FROM api_keys WHERE id = :key_id")
_REVOKE_ONE = text(
    """
    UPDATE api_keys SET status = 'revoked', revoked_at = :now, revoke_reason = :reason
    WHERE id = :key_id AND status = 'active' RETURNING id
    """
)
# source = 'user' keys are never touched by a billing flow (seed 004: a
# re-subscribe overwrote a user's own key)
_REVOKE_MANAGED = text(
    """
    UPDATE api_keys SET status = 'revoked', revoked_at = :now, revoke_reason = :reason
    WHERE subscription_id = :subscription_id AND source = 'managed' AND status = 'active' RETURNING id
    """
)


async def apply_revoke_key(conn: AsyncConnection, message: RevokeKeyMessage, now: datetime) -> Effect:
    """Revoke one key by ``key_id`` (any source) or the managed keys of a subscription.

    Outcomes: ``revoked`` (with ``key_ids``) or ``already_revoked`` (no-op).

    Raises:
      UnknownApiKey, UnknownSubscription: Permanent errors.
    """
    if message.key_id is not None:
        owner = await _one(conn, _KEY_OWNER, key_id=message.key_id)
        if owner is None:
            raise UnknownApiKey(f"unknown API key {message.key_id!r}")
        await _lock_account(conn, owner["account_id"])
        rows = (
            await conn.execute(_REVOKE_ONE, {"key_id": message.key_id, "now": now, "reason": message.reason})
        ).all()
    else:
        owner = await _one(conn, _SUBSCRIPTION_ACCOUNT, subscription_id=message.subscription_id)
        if owner is None:
            raise UnknownSubscription(f"unknown subscription {message.subscription_id!r}")
        await _lock_account(conn, owner["account_id"])
        rows = (
            await conn.execute(
                _REVOKE_MANAGED,
                {"subscription_id": message.subscription_id, "now": now, "reason": message.reason},
            )
        ).all()
    key_ids = sorted(r[0] for r in rows)
    return Effect(
        "revoked" if key_ids else "already_revoked", {"account_id": owner["account_id"], "key_ids": key_ids}
    )


# --------------------------------------------------------------------------- auto_top_up (recovery points)

_ATTEMPT_OF_MESSAGE = text(
    """
    SELECT id, account_id, provider_idempotency_key, amount_micros, currency, payment_method_ref, status
    FROM top_up_attempts WHERE message_idempotency_key = :key
    """
)
_INSERT_ATTEMPT = text(
    """
    INSERT INTO top_up_attempts (id, account_id, message_idempotency_key, provider_idempotency_key, amount_micros,
        currency, payment_method_ref, billing_period, status, recovery_point, reason, created_at, updated_at,
        reconcile_after)
    VALUES (:id, :account_id, :key, :provider_key, :amount_micros, :currency, :payment_method_ref, :period,
        'pending', 'started', :reason, :now, :now, :reconcile_after)
    """
)
# The waits end and their keys go back to ``processing`` in one statement:
# the re-sent message (and only it, or a re-send that arrives after it) runs
# the effect; until then a re-send of a waiting key is a no-op.  The resume
# starts the key's delivery count afresh: a message that waited on several
# top-ups in turn (BILLING_TOP_UPS_PER_PERIOD > 1, each declined) was dying
# of its own resumes; a poison message is still bounded, per resume.
_WAITS = _sql(
    """
    WITH w AS (
        DELETE FROM funds_waits WHERE account_id = :account_id
        RETURNING idempotency_key, actor_name, queue_name, kwargs
    ), k AS (
        UPDATE idempotency_keys k SET status = 'processing', lease_expires_at = :lease_expires_at, attempts = 0,
            request = jsonb_build_object('actor_name', w.actor_name, 'queue_name', w.queue_name, 'kwargs', w.kwargs),
            updated_at = :now
        FROM w WHERE k.key = w.idempotency_key AND k.status = 'waiting_for_funds'
    )
    SELECT idempotency_key, actor_name, queue_name, kwargs FROM w ORDER BY idempotency_key
    """,
    json_columns=("kwargs",),
)


async def resume_waiting(
    conn: AsyncConnection, account_id: str, now: datetime, policy: BillingPolicy
) -> list[OutboxMessage]:
    """Re-send, with their own keys, the messages that waited for this account's top-up (outbox rows to relay).

    Called in the transaction that settles the top-up (or, by the
    completer, for waits whose top-up is gone), under the account's lock.
    """
    rows = (
        (
            await conn.execute(
                _WAITS,
                {"account_id": account_id, "now": now, "lease_expires_at": now + policy.key_lease},
            )
        )
        .mappings()
        .all()
    )
    return [OutboxMessage(r["queue_name"], r["actor_name"], r["kwargs"]) for r in rows]


async def begin_top_up(
    conn: AsyncConnection, message: AutoTopUpMessage, now: datetime, policy: BillingPolicy
) -> TopUpIntent | Effect:
    """Phase 1 of an auto-top-up: record the attempt and the provider's idempotency key.

    Returns the recorded :class:`TopUpIntent` (also when a previous delivery
    recorded it: the caller continues from the provider call), or a final
    :class:`Effect` when no attempt is allowed (``not_configured``,
    ``auto_top_up_disabled`` with the reason from the account's record,
    ``limit_reached`` for the period, ``cap_reached`` for the account's
    monthly cap, counting pending and succeeded attempts); waiting messages
    are then resumed so they finish.

    Raises:
      UnknownAccount: Permanent error.
    """
    existing = await _one(conn, _ATTEMPT_OF_MESSAGE, key=message.idempotency_key)
    if existing is not None:
        return TopUpIntent.from_row(existing)
    account = await _lock_account(conn, message.account_id)
    if not account["auto_top_up_enabled"] or not account["payment_method_ref"]:
        disabled = account["auto_top_up_disabled_reason"]
        return Effect(
            "auto_top_up_disabled" if disabled else "not_configured",
            {"account_id": account["id"], **({"reason": disabled} if disabled else {})},
            outbox=await resume_waiting(conn, account["id"], now, policy),
        )
    period = top_up_period(now)
    counts = await _one(conn, _PERIOD_TOP_UPS, account_id=account["id"], period=period)
    assert counts is not None
    if counts["attempts"] >= policy.top_ups_per_period:
        return Effect(
            "limit_reached",
            {"account_id": account["id"], "period": period, "attempts": int(counts["attempts"])},
            outbox=await resume_waiting(conn, account["id"], now, policy),
        )
    amount = message.amount_micros or int(account["auto_top_up_amount_micros"])
    cap = account["auto_top_up_monthly_cap_micros"]
    if cap is not None and int(counts["committed_micros"]) + amount > cap:
        return Effect(
            "cap_reached",
            {
                "account_id": account["id"],
                "period": period,
                "monthly_cap_micros": int(cap),
                "topped_up_micros": int(counts["committed_micros"]),
                "amount_micros": amount,
            },
            outbox=await resume_waiting(conn, account["id"], now, policy),
        )
    attempt_id = "tua_" + uuid.uuid4().hex
    row = {
        "id": attempt_id,
        "account_id": account["id"],
        "key": message.idempotency_key,
        # derived from our row id (rocket-rides): a retry of this attempt
        # always sends the provider the same key
        "provider_key": f"billing-queue:top-up:{attempt_id}",
        "amount_micros": amount,
        "currency": account["currency"],
        "payment_method_ref": account["payment_method_ref"],
        "period": period,
        "reason": message.reason,
        "now": now,
        # the reconciler's deadline: past it the provider is asked what became of the charge
        "reconcile_after": now + policy.top_up_deadline,
    }
    await conn.execute(_INSERT_ATTEMPT, row)
    return TopUpIntent(
        attempt_id=attempt_id,
        account_id=account["id"],
        provider_idempotency_key=row["provider_key"],
        amount_micros=row["amount_micros"],
        currency=account["currency"].strip(),
        payment_method_ref=account["payment_method_ref"],
        status="pending",
    )


_LOCK_ATTEMPT = text(
    """
    SELECT id, status, provider_charge_id, amount_micros, provider_status, charge_lease_until
    FROM top_up_attempts WHERE id = :id FOR UPDATE
    """
)
_ATTEMPT_SUCCEEDED = text(
    """
    UPDATE top_up_attempts SET status = 'succeeded', recovery_point = 'finished', provider_charge_id = :charge_id,
        provider_status = NULL, reconcile_after = NULL, updated_at = :now WHERE id = :id
    """
)
_ATTEMPT_DECLINED = text(
    """
    UPDATE top_up_attempts SET status = :status, recovery_point = 'finished', decline_reason = :reason,
        provider_charge_id = COALESCE(provider_charge_id, :charge_id), last_error = :error,
        provider_status = NULL, reconcile_after = NULL, updated_at = :now WHERE id = :id
    """
)
# still pending: the provider has the charge but has not finished it; the
# reconciler looks again at reconcile_after
_ATTEMPT_PROCESSING = text(
    """
    UPDATE top_up_attempts SET provider_status = 'processing', reconcile_after = :reconcile_after,
        provider_charge_id = COALESCE(provider_charge_id, :charge_id), updated_at = :now WHERE id = :id
    """
)
_DECLINES_RESET = text("UPDATE accounts SET auto_top_up_consecutive_declines = 0 WHERE id = :id")
# the counter is incremented in SQL; at the limit auto-top-up switches itself
# off and the account's record says why and when
_DECLINES_ADD = text(
    """
    UPDATE accounts SET auto_top_up_consecutive_declines = auto_top_up_consecutive_declines + 1,
        auto_top_up_enabled = CASE WHEN :limit > 0 AND auto_top_up_consecutive_declines + 1 >= :limit
            THEN false ELSE auto_top_up_enabled END,
        auto_top_up_disabled_reason = CASE WHEN :limit > 0 AND auto_top_up_consecutive_declines + 1 >= :limit
            THEN 'disabled after ' || (auto_top_up_consecutive_declines + 1) || ' consecutive declined top-ups'
            ELSE auto_top_up_disabled_reason END,
        auto_top_up_disabled_at = CASE WHEN :limit > 0 AND auto_top_up_consecutive_declines + 1 >= :limit
            THEN CAST(:now AS timestamptz) ELSE auto_top_up_disabled_at END,
        updated_at = :now
    WHERE id = :id
    RETURNING auto_top_up_consecutive_declines AS declines, NOT auto_top_up_enabled AS disabled
    """
)
#: The provider's answers :func:`finish_top_up` records (``unknown``: no answer, nothing to record).
TOP_UP_STATES = ("succeeded", "declined", "processing", "failed", "unknown")


async def finish_top_up(
    conn: AsyncConnection,
    intent: TopUpIntent,
    *,
    state: str,
    charge_id: str | None,
    reason: str | None,
    now: datetime,
    policy: BillingPolicy,
    unless_charged_since: datetime | None = None,
) -> Effect | None:
    """Phase 3 of an auto-top-up (or the reconciler's settlement): record the provider's answer once.

    The ledger entry's key is derived from the attempt id, and the attempt
    row is locked, so a repeated phase 3 is a no-op that returns the stored
    state.  Waiting messages are resumed in the same transaction whatever
    the answer: after a success they re-run with the credited balance,
    otherwise they follow the past_due / grace rules.

    Parameters:
      state: ``succeeded`` (credit the ledger once), ``declined`` (the
        provider refused the card: counts towards switching auto-top-up
        off), ``failed`` (nothing was charged and nothing will be: the
        provider rejected the request, or reconciliation found no charge;
        counted like a decline), or ``processing`` (the provider has the
        charge but not its result: the attempt stays pending, owned by the
        reconciler, and the waits are released so renewals follow the
        past_due / grace rules meanwhile); or ``unknown`` (no answer: the
        stored state of a settled attempt, else ``top_up_reconciling``, the
        reconciler's turn, writing nothing).
      charge_id: The provider's id of the charge, when it gave one.
      reason: The decline code or the failure's reason.
      unless_charged_since: Reconciler only: do nothing (return None) if a
        charge request was sent at or after this time (a charge lease was
        taken after the provider was asked), since the answer may be stale.

    A decline or a failure adds one to the account's consecutive declines
    (a success resets them); at ``policy.disable_after_declines``
    auto-top-up switches itself off, with the reason and time in the
    account's record.

    Returns:
      Effect: ``topped_up``, ``declined``, ``top_up_failed``,
      ``top_up_processing`` or ``top_up_reconciling`` (those again for a
      repeat); None when skipped (``unless_charged_since``).

    Raises:
      db.errors.InvalidValue: An unknown ``state`` (a ``ValueError``).
    """
    if state not in TOP_UP_STATES:
        raise InvalidValue(f"unknown top-up state {state!r}")
    await _lock_account(conn, intent.account_id)
    attempt = await _one(conn, _LOCK_ATTEMPT, id=intent.attempt_id)
    assert attempt is not None
    base = {"attempt_id": intent.attempt_id, "amount_micros": intent.amount_micros}
    if attempt["status"] == "succeeded":
        return Effect("topped_up", {**base, "charge_id": attempt["provider_charge_id"]})
    if attempt["status"] == "declined":
        return Effect("declined", base)
    if attempt["status"] == "failed":
        return Effect("top_up_failed", base)
    if state == "unknown":
        return Effect("top_up_reconciling", {**base, "provider_status": attempt["provider_status"]})
    lease = attempt["charge_lease_until"]
    if unless_charged_since is not None and lease is not None and lease > unless_charged_since:
        return None
    if state == "succeeded":
        balance = await _post_ledger_entry(
            conn,
            account_id=intent.account_id,
            amount_micros=intent.amount_micros,
            kind="top_up",
            top_up_attempt_id=intent.attempt_id,
            idempotency_key=f"top_up:{intent.attempt_id}",
            now=now,
        )
        await conn.execute(_ATTEMPT_SUCCEEDED, {"id": intent.attempt_id, "charge_id": charge_id, "now": now})
        await conn.execute(_DECLINES_RESET, {"id": intent.account_id})
        outbox = await resume_waiting(conn, intent.account_id, now, policy)
        return Effect("topped_up", {**base, "charge_id": charge_id, "balance_micros": balance}, outbox=outbox)
    if state == "processing":
        reconcile_after = now + policy.processing_poll
        await conn.execute(
            _ATTEMPT_PROCESSING,
            {"id": intent.attempt_id, "charge_id": charge_id, "reconcile_after": reconcile_after, "now": now},
        )
        outbox = await resume_waiting(conn, intent.account_id, now, policy)
        return Effect(
            "top_up_processing",
            {**base, "charge_id": charge_id, "reconcile_after": reconcile_after.isoformat()},
            outbox=outbox,
        )
    await conn.execute(
        _ATTEMPT_DECLINED,
        {
            "id": intent.attempt_id,
            "status": state,
            "reason": reason if state == "declined" else None,
            "error": reason if state == "failed" else None,
            "charge_id": charge_id,
            "now": now,
        },
    )
    outbox = await resume_waiting(conn, intent.account_id, now, policy)
    # a failure counts like a decline: a payment method that never answers (or a
    # request the provider always refuses) switches auto-top-up off after the same
    # number of tries, instead of keeping a renewal waiting top-up after top-up
    declines = await _one(
        conn, _DECLINES_ADD, id=intent.account_id, limit=policy.disable_after_declines, now=now
    )
    assert declines is not None
    counts = {
        "consecutive_declines": int(declines["declines"]),
        "auto_top_up_disabled": bool(declines["disabled"]),
    }
    if state == "failed":
        return Effect("top_up_failed", {**base, "reason": reason, **counts}, outbox=outbox)
    return Effect("declined", {**base, "decline_reason": reason, **counts}, outbox=outbox)


# A charge request goes out only under a lease, only while the attempt is
# pending and not already processing at the provider, and only within the
# provider's idempotency-key window (Stripe keeps a key 24 h: a charge sent
# later under the same key would be a new charge).
_TAKE_CHARGE_LEASE = text(
    """
    UPDATE top_up_attempts SET charge_lease_until = :until, updated_at = :now
    WHERE id = :id AND status = 'pending' AND provider_status IS DISTINCT FROM 'processing'
      AND created_at > :window_start
    RETURNING id
    """
)
_RECONCILE_NOW = text(
    """
    UPDATE top_up_attempts SET reconcile_after = LEAST(reconcile_after, :now), updated_at = :now
    WHERE id = :id AND status = 'pending'
    """
)


async def take_charge_lease(
    conn: AsyncConnection, intent: TopUpIntent, *, now: datetime, key_window: timedelta, policy: BillingPolicy
) -> bool:
    """Phase 2's permit: may a charge request go to the provider now? (autocommit, one statement).

    Returns False, and hands the attempt to the reconciler at once, when the
    attempt is no longer pending, is ``processing`` at the provider, or is
    older than the provider's idempotency-key window (``key_window``): then
    the provider is asked what became of the charge instead of being sent
    it again (an operator's retry the next day must not charge twice).

    Parameters:
      key_window: How long the provider honours an idempotency key (Stripe: 24 h).
    """
    row = await _one(
        conn,
        _TAKE_CHARGE_LEASE,
        id=intent.attempt_id,
        until=now + policy.charge_lease,
        now=now,
        window_start=now - key_window,
    )
    if row is None:
        await conn.execute(_RECONCILE_NOW, {"id": intent.attempt_id, "now": now})
        return False
    return True


# --------------------------------------------------------------------------- operator set-up

_INSERT_ACCOUNT = text(
    """
    INSERT INTO accounts (id, currency, balance_micros, auto_top_up_enabled, auto_top_up_threshold_micros,
        auto_top_up_amount_micros, payment_method_ref, auto_top_up_monthly_cap_micros)
    VALUES (:id, :currency, 0, :enabled, :threshold, :amount, :payment_method_ref, :monthly_cap)
    ON CONFLICT (id) DO NOTHING RETURNING id
    """
)


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
        row = await _one(
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
        await _post_ledger_entry(
            conn,
            account_id=account_id,
            amount_micros=balance_micros,
            kind="adjustment",
            idempotency_key=f"account-opening:{account_id}",
            now=now,
        )
    return True


_INSERT_PLAN = text(
    """
    INSERT INTO plans (id, name, price_micros, currency, interval, interval_count)
    VALUES (:id, :name, :price_micros, :currency, :interval, :interval_count)
    ON CONFLICT (id) DO NOTHING RETURNING id
    """
)


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
        row = await _one(
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
    await _lock_account(conn, account_id)
    key_id, prefix, plaintext = await _insert_api_key(
        conn, account_id=account_id, subscription_id=None, source="user", now=now
    )
    return IssuedKey(key_id, account_id, "", prefix, plaintext)


_CREDIT_EXISTS = text("SELECT account_id, amount_micros FROM ledger_entries WHERE idempotency_key = :key")


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
    account = await _lock_account(conn, account_id)
    key = f"credit:{idempotency_key}"
    before = await _one(conn, _CREDIT_EXISTS, key=key)
    if before is not None:
        if (before["account_id"], int(before["amount_micros"])) != (account_id, amount_micros):
            raise IdempotencyConflict(
                f"idempotency conflict: credit key {idempotency_key!r} already credited"
                f" {int(before['amount_micros'])} micros to account {before['account_id']!r};"
                f" nothing changed (this request: {amount_micros} micros to {account_id!r})"
            )
        return False, int(account["balance_micros"])
    balance = await _post_ledger_entry(
        conn,
        account_id=account_id,
        amount_micros=amount_micros,
        kind="adjustment",
        idempotency_key=key,
        now=now,
    )
    return True, balance


_CONFIGURE_TOP_UP = text(
    """
    UPDATE accounts SET
        auto_top_up_enabled = COALESCE(:enabled, auto_top_up_enabled),
        auto_top_up_threshold_micros = COALESCE(:threshold, auto_top_up_threshold_micros),
        auto_top_up_amount_micros = COALESCE(:amount, auto_top_up_amount_micros),
        payment_method_ref = COALESCE(:payment_method_ref, payment_method_ref),
        auto_top_up_monthly_cap_micros = CASE WHEN :clear_cap THEN NULL
            ELSE COALESCE(:monthly_cap, auto_top_up_monthly_cap_micros) END,
        auto_top_up_consecutive_declines = CASE WHEN :enabled THEN 0 ELSE auto_top_up_consecutive_declines END,
        auto_top_up_disabled_reason = CASE WHEN :enabled THEN NULL
            WHEN :enabled = false THEN 'disabled by an operator' ELSE auto_top_up_disabled_reason END,
        auto_top_up_disabled_at = CASE WHEN :enabled THEN NULL
            WHEN :enabled = false THEN CAST(:now AS timestamptz) ELSE auto_top_up_disabled_at END,
        updated_at = :now
    WHERE id = :id
    RETURNING id
    """
)


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
) -> None:
    """Change an account's auto-top-up settings (None leaves a setting as it is).

    Enabling resets the consecutive-decline count and clears the reason it
    was switched off.

    Raises:
      UnknownAccount: No such account.
      db.errors.SettingRefused: Enabling without amount, threshold and payment method
        (``accounts_top_up_configured``), a cap below the amount
        (``accounts_top_up_cap_covers_amount``), or an amount out of range.
    """
    await _lock_account(conn, account_id)
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
                "now": now,
            },
        )


_SET_CANCEL_AT_PERIOD_END = text(
    """
    UPDATE subscriptions SET cancel_at_period_end = :cancel, updated_at = :now
    WHERE id = :id AND status <> 'canceled'
    RETURNING id, status, current_period_end
    """
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
    owner = await _one(conn, _SUBSCRIPTION_ACCOUNT, subscription_id=subscription_id)
    if owner is None:
        raise UnknownSubscription(f"unknown subscription {subscription_id!r}")
    await _lock_account(conn, owner["account_id"])
    row = await _one(conn, _SET_CANCEL_AT_PERIOD_END, id=subscription_id, cancel=cancel, now=now)
    if row is None:
        raise UnknownSubscription(f"subscription {subscription_id!r} is canceled already")
    return {
        "subscription_id": row["id"],
        "status": row["status"],
        "cancel_at_period_end": cancel,
        "current_period_end": row["current_period_end"].isoformat(),
    }


# --------------------------------------------------------------------------- outbox

_INSERT_OUTBOX = _sql(
    """
    INSERT INTO outbox (message_id, queue_name, actor_name, kwargs)
    SELECT m->>'message_id', m->>'queue_name', m->>'actor_name', m->'kwargs'
    FROM jsonb_array_elements(:messages) AS m
    """,
    json_params=("messages",),
)


async def insert_outbox(conn: AsyncConnection, messages: list[OutboxMessage]) -> None:
    """Write messages to the outbox in the effect's transaction (one statement for all)."""
    if not messages:
        return
    payload = [
        {
            "message_id": m.message_id,
            "queue_name": m.queue_name,
            "actor_name": m.actor_name,
            "kwargs": m.kwargs,
        }
        for m in messages
    ]
    await conn.execute(_INSERT_OUTBOX, {"messages": payload})


_DELETE_OUTBOX = text("DELETE FROM outbox WHERE message_id = ANY(:ids)")


async def delete_outbox(conn: AsyncConnection, message_ids: list[str]) -> None:
    """Forget relayed outbox messages."""
    if message_ids:
        await conn.execute(_DELETE_OUTBOX, {"ids": message_ids})


_STALE_OUTBOX = _sql(
    """
    SELECT message_id, queue_name, actor_name, kwargs FROM outbox
    WHERE created_at < now() - make_interval(secs => :older_than_s)
    ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
    """,
    json_columns=("kwargs",),
)


async def claim_stale_outbox(
    conn: AsyncConnection, *, older_than_s: float, limit: int = 500
) -> list[OutboxMessage]:
    """Lock outbox messages left behind by a worker that died between commit and relay."""
    rows = (
        (await conn.execute(_STALE_OUTBOX, {"older_than_s": older_than_s, "limit": limit})).mappings().all()
    )
    return [OutboxMessage(r["queue_name"], r["actor_name"], r["kwargs"], r["message_id"]) for r in rows]


# --------------------------------------------------------------------------- reissue a managed key (operators)


_REISSUE_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended('reissue_key:' || :key, 0))")
_KEY_PLACE = text("SELECT account_id, subscription_id FROM api_keys WHERE id = :key_id")
_KEY_FOR_REISSUE = text(
    "SELECT id, account_id, subscription_id, source, status FROM api_keys WHERE id = :key_id FOR UPDATE"
)
_LOCK_SUBSCRIPTION_STATUS = text("SELECT status FROM subscriptions WHERE id = :subscription_id FOR UPDATE")


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
    place = await _one(conn, _KEY_PLACE, key_id=key_id)
    if place is None:
        raise UnknownApiKey(f"unknown API key {key_id!r}")
    await _lock_account(conn, place["account_id"])
    sub = None
    if place["subscription_id"] is not None:
        sub = await _one(conn, _LOCK_SUBSCRIPTION_STATUS, subscription_id=place["subscription_id"])
    old = await _one(conn, _KEY_FOR_REISSUE, key_id=key_id)
    assert old is not None  # keys are never deleted
    if old["source"] != "managed":
        raise KeyNotReissuable(f"key {key_id!r} is a user key; only managed keys are reissued")
    if old["status"] != "active":
        raise KeyNotReissuable(f"key {key_id!r} is {old['status']}; only an active key is reissued")
    if sub is None or sub["status"] == "canceled":
        raise KeyNotReissuable(f"key {key_id!r} belongs to a canceled subscription")
    new_key_id, prefix, plaintext = await _insert_api_key(
        conn, account_id=old["account_id"], subscription_id=old["subscription_id"], source="managed", now=now
    )
    await conn.execute(
        _REVOKE_ONE, {"key_id": key_id, "now": now, "reason": f"{reason}: replaced by {new_key_id}"}
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
