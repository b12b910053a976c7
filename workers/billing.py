"""BillingService: runs one message through the idempotent money path, as a pipeline of named steps.

For every delivery (SPEC "Processing rules"), :meth:`BillingService.handle` runs:

1. :meth:`~BillingService.verify`: the arguments have a canonical JSON form
   and, with signing keys, a valid signature;
2. :meth:`~BillingService.validate`: the arguments against the contract (a
   malformed or unauthenticated message is recorded for operators and never
   retried);
3. :meth:`~BillingService.route`: a renewal or a usage event takes the fast
   path (a group commit, :mod:`workers.group_commit`), anything else the
   Python path;
4. :meth:`~BillingService.claim`: claim the idempotency key in one
   autocommit statement, which also counts the delivery (bounding poison
   messages) and returns a stored outcome for a repeated key without
   touching money (:meth:`~BillingService.settled`); the same key with
   other arguments is an idempotency conflict: recorded, never applied;
5. :meth:`~BillingService.apply`: the kind's transaction script
   (:data:`workers.transactions.TRANSACTION_SCRIPTS`): lock the key row,
   lock the account, check the balance, write the ledger and the balance
   together, write follow-up messages to the outbox, store the outcome,
   commit; ``auto_top_up`` runs in phases around the provider call
   (:mod:`workers.top_up`), so a crash between two of them neither loses
   the credit nor charges twice;
6. :meth:`~BillingService.after_commit`: relay the outbox to Redis and
   deliver a new API key's plaintext on the pub/sub channel; a crash before
   this loses nothing, the outbox sweeper relays what was left.

An error is classified once, in ``handle``: a :class:`PermanentError` is
recorded and the key marked failed (or dead), both in one transaction; any
other error is retried, and recorded when the retries are exhausted.  A
failure PostgreSQL cannot take is retried as :class:`DatabaseUnavailable`,
never dropped: a key is never failed without its record.
"""

from __future__ import annotations

import asyncio
import json
import traceback as tb
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from db import money
from db.engine import transaction, translate_errors
from db.money import BillingPolicy, Effect, IssuedKey
from tasks.errors import (
    BillingError,
    IdempotencyConflict,
    MessageAuthenticationFailed,
    MessageValidationError,
    PermanentError,
    TooManyDeliveries,
)
from tasks.messages import (
    QUEUE_OF_ACTOR,
    BillingMessage,
    RecordUsageMessage,
    RenewMessage,
    check_json_text,
    validate_message,
)
from tasks.signing import SigningKeys

from . import metrics, outbox
from .clock import Clock, SystemClock
from .crash import FAST_PATH_CRASHPOINTS, crashpoint
from .group_commit import FAST_PATHS, GroupCommit
from .logging import mark_logged
from .providers.base import PaymentProvider
from .transactions import TRANSACTION_SCRIPTS

__all__ = ["BillingService", "Delivery", "API_KEY_CHANNEL"]

log = structlog.get_logger("billing")

#: Redis pub/sub channel on which a newly issued API key's plaintext is
#: published once, after commit, **only when no public key is configured**
#: for its account (a lossy delivery; the worker warns at start-up).
#: With one, the key is sealed and kept in ``api_key_deliveries`` until the
#: consumer acknowledges it (``db/key_delivery.py``), and nothing is published.
#: Pub/sub keeps nothing: the plaintext is never stored, in PostgreSQL or in
#: Redis, and never logged.
API_KEY_CHANNEL = "billing:api-keys:issued"


@dataclass(frozen=True)
class Delivery:
    """One delivery of a message, as Dramatiq handed it to the actor.

    Attributes:
      message_id: Dramatiq's message id (stable across redeliveries and retries).
      retries: Retries already made of this message (Dramatiq's ``retries`` option).
      max_retries: Retries allowed for transient errors.
      queue_name: The queue it came from.
      signature: The message's ``billing_signature`` option (see :mod:`tasks.signing`).
    """

    message_id: str
    retries: int = 0
    max_retries: int = 8
    queue_name: str = ""
    signature: str | None = None


@dataclass
class BillingService:
    """The money path of the four actors.

    Parameters:
      engine: Async engine on PostgreSQL.
      provider: Payment provider for ``auto_top_up``.
      broker: Dramatiq broker the outbox is relayed to (None: leave it to the sweeper).
      clock: Source of "now" (UTC).
      policy: Tunable rules (top-ups per period...).
      max_deliveries: Deliveries of one key after which it is dead-lettered.
      crashpoints: Steps at which to simulate a crash (tests only).
      exit_on_crash: Crash points exit the process (True) or raise SimulatedCrash.
      signing_keys: When set, every delivery must carry a valid signature
        (:mod:`tasks.signing`); one that does not is recorded and never applied.
    """

    engine: AsyncEngine
    provider: PaymentProvider
    broker: dramatiq.Broker | None = None
    clock: Clock = field(default_factory=SystemClock)
    policy: BillingPolicy = field(default_factory=BillingPolicy)
    max_deliveries: int = 10
    crashpoints: dict[str, str] = field(default_factory=dict)
    exit_on_crash: bool = False
    signing_keys: SigningKeys | None = None
    renew_fast_path: bool = True
    usage_fast_path: bool = True
    max_batch: int = 64
    max_batches_in_flight: int = 1

    def __post_init__(self) -> None:
        self.autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        #: Actor name -> its group commit (the fast path of renewals and usage events).
        self.group_commits = {
            name: GroupCommit(self, path, max_batch=self.max_batch, max_in_flight=self.max_batches_in_flight)
            for name, path in FAST_PATHS.items()
        }

    # ------------------------------------------------------------------ entry point

    async def handle(self, actor_name: str, kwargs: Any, delivery: Delivery) -> dict[str, Any]:
        """Process one delivery of ``actor_name`` with ``kwargs``: verify, validate, claim, route, apply, after commit.

        Returns:
          dict: The stored outcome (``{"outcome": ..., ...}``); a repeated key
          returns the first delivery's outcome with ``"duplicate": True``.

        Raises:
          PermanentError: Recorded in ``failed_messages``; not to be retried.
          TransientError: To be retried with backoff (recorded once retries are exhausted);
            :class:`DatabaseUnavailable` also in place of a permanent error that
            PostgreSQL could not record.
        """
        structlog.contextvars.bind_contextvars(message_id=delivery.message_id, actor=actor_name)
        try:
            self.verify(actor_name, kwargs, delivery)
            message = self.validate(actor_name, kwargs)
        except (MessageValidationError, MessageAuthenticationFailed) as exc:
            # recorded and logged (one message_failed line) by record_failure
            await self.record_failure(actor_name, kwargs, None, delivery, exc, attempts=delivery.retries + 1)
            raise
        structlog.contextvars.bind_contextvars(
            idempotency_key=message.idempotency_key, account_id=getattr(message, "account_id", None)
        )
        fingerprint = message.fingerprint()
        try:
            claim, applied = await self.claim(message, fingerprint, delivery, fast=self.route(message))
            result = self.settled(message, claim)
            if result is None and applied is not None:
                result = self._applied_on_fast_path(message, applied)
            elif result is None:
                result = await self.apply(message)
        except PermanentError as exc:
            # the key's end and its failure record commit together; when they
            # cannot (PostgreSQL gone), DatabaseUnavailable replaces ``exc`` and
            # the delivery is retried, so the failure is recorded at a later one
            await self.record_failure(
                actor_name,
                kwargs,
                message,
                delivery,
                exc,
                attempts=delivery.retries + 1,
                end_key=None
                if isinstance(exc, IdempotencyConflict)
                else (fingerprint, "dead" if isinstance(exc, TooManyDeliveries) else "failed"),
            )
            raise
        except Exception as exc:
            await self._transient(message, fingerprint, kwargs, delivery, exc)
            raise
        if result.get("duplicate"):  # a stored outcome, or completed by a concurrent delivery
            metrics.duplicate_suppressed(actor_name)
            log.info("duplicate_suppressed", outcome=result.get("outcome"))
        elif result.get("waiting"):  # left waiting for funds (a re-send, or seen under the key's lock)
            log.info("waiting_for_funds", outcome=result.get("outcome"))
        else:
            log.info("message_processed", outcome=result.get("outcome"))
        return result

    # ------------------------------------------------------------------ the steps

    def verify(self, actor_name: str, kwargs: Any, delivery: Delivery) -> None:
        """Step 1: the arguments have a canonical JSON form and, with signing keys, a valid signature.

        Raises:
          MessageValidationError: What no JSON text can hold (a lone surrogate, NaN).
          MessageAuthenticationFailed: Unsigned, unknown key, forged or tampered with.
        """
        check_json_text(actor_name, kwargs)
        if self.signing_keys is not None:
            problem = self.signing_keys.verify(actor_name, delivery.message_id, kwargs, delivery.signature)
            if problem is not None:
                raise MessageAuthenticationFailed(problem)

    def validate(self, actor_name: str, kwargs: Any) -> BillingMessage:
        """Step 2: the arguments against the contract (:func:`tasks.messages.validate_message`).

        Raises:
          MessageValidationError: An unknown actor, or arguments that break its contract.
        """
        return validate_message(actor_name, kwargs, text_checked=True)

    def route(self, message: BillingMessage) -> bool:
        """Step 3: True when ``message`` takes the fast path (claimed and applied in a group commit).

        Renewals do with ``renew_fast_path`` on, usage events with
        ``usage_fast_path`` on, unless a crash point of the Python path's
        steps names their key (a crash test needs that path).
        """
        if isinstance(message, RenewMessage):
            on = self.renew_fast_path
        elif isinstance(message, RecordUsageMessage):
            on = self.usage_fast_path
        else:
            return False
        return on and not any(
            f in message.idempotency_key
            for name, f in self.crashpoints.items()
            if name not in FAST_PATH_CRASHPOINTS
        )

    async def claim(
        self, message: BillingMessage, fingerprint: str, delivery: Delivery, *, fast: bool
    ) -> tuple[money.ClaimedKey, dict[str, Any] | None]:
        """Step 4: claim the idempotency key (one autocommit statement, counting the delivery).

        On the fast path the kind's group commit claims it with the messages
        that arrive together and applies it if it can.

        Returns:
          The claim, and the outcome when the fast path applied the message (else None).
        """
        if fast:
            return await self.group_commits[message.actor_name].submit(
                message, fingerprint, delivery.message_id
            )
        async with translate_errors(), self.autocommit.connect() as conn:
            claim = await money.claim_key(
                conn,
                money.KeyClaim(
                    key=message.idempotency_key,
                    kind=message.actor_name,
                    fingerprint=fingerprint,
                    account_id=getattr(message, "account_id", None),
                    message_id=delivery.message_id,
                    request=money.message_request(message.actor_name, message.queue_name, message.kwargs()),
                ),
                lease_expires_at=self.clock.now() + self.policy.key_lease,
            )
        return claim, None

    def settled(self, message: BillingMessage, claim: money.ClaimedKey) -> dict[str, Any] | None:
        """What the claim alone decides: the stored outcome of a repeat or of a wait; None to apply.

        Raises:
          IdempotencyConflict: The key was used with other arguments.
          TooManyDeliveries: Delivered more than ``max_deliveries`` times (a poison message).
        """
        if claim.conflict:
            metrics.idempotency_conflict(message.actor_name)
            raise IdempotencyConflict(
                f"idempotency key {message.idempotency_key!r} was used before with different arguments"
            )
        if claim.status == "completed":
            return {**(claim.result or {}), "duplicate": True}
        if claim.status == "waiting_for_funds":
            # a re-send (the scheduler's next pass) of a key that waits for a
            # top-up: not a delivery; the top-up settling resumes it once
            return {**(claim.result or {}), "waiting": True}
        if claim.attempts > self.max_deliveries:
            raise TooManyDeliveries(
                f"delivered {claim.attempts} times without finishing (limit {self.max_deliveries})"
            )
        return None

    def _applied_on_fast_path(self, message: BillingMessage, outcome: dict[str, Any]) -> dict[str, Any]:
        """Count and tag a renewal the fast path committed (its outcome as stored)."""
        if not outcome.get("duplicate"):
            metrics.effect_committed(message.actor_name, Effect(outcome["outcome"], outcome))
            structlog.contextvars.bind_contextvars(account_id=outcome.get("account_id"))
        return outcome

    async def apply(self, message: BillingMessage) -> dict[str, Any]:
        """Step 5: run the kind's transaction script (:data:`workers.transactions.TRANSACTION_SCRIPTS`)."""
        return await TRANSACTION_SCRIPTS[message.actor_name](self, message)

    async def unfinished(self, keys: list[str]) -> set[str]:
        """Which of these idempotency keys an earlier delivery claimed and did not finish (one statement).

        Raises:
          DatabaseUnavailable: PostgreSQL could not be reached.
        """
        async with translate_errors(), self.autocommit.connect() as conn:
            return await money.unfinished_keys(conn, keys)

    # ------------------------------------------------------------------ after commit

    async def after_commit(self, effect: Effect) -> None:
        """Step 6: deliver a new key and relay the outbox; the effect is committed, so nothing here fails the message.

        A relay that fails leaves its rows in the outbox, where the sweeper of
        any worker picks them up (``outbox_sweep_after_ms``).
        """
        if effect.issued_key is not None:
            await self._deliver_key(effect.issued_key)
        await outbox.relay_committed(self.engine, self.broker, effect.outbox)

    async def sweep_outbox(self, *, older_than_s: float, limit: int = 500) -> int:
        """Relay outbox messages a dead worker left behind. Returns how many were relayed."""
        async with transaction(self.engine) as conn:
            stale = await money.claim_stale_outbox(conn, older_than_s=older_than_s, limit=limit)
            if stale:
                assert self.broker is not None
                await outbox.enqueue(self.broker, stale)
                await money.delete_outbox(conn, [m.message_id for m in stale])
        return len(stale)

    async def _deliver_key(self, issued: IssuedKey) -> None:
        """Publish an unsealed key on :data:`API_KEY_CHANNEL` (no public key configured: best effort, lossy)."""
        if self.broker is None or not hasattr(self.broker, "client"):
            return
        payload = json.dumps(
            {
                "account_id": issued.account_id,
                "subscription_id": issued.subscription_id,
                "key_id": issued.key_id,
                "prefix": issued.prefix,
                "api_key": issued.plaintext,
            }
        )
        client = self.broker.client
        try:
            await asyncio.to_thread(client.publish, API_KEY_CHANNEL, payload)
        except Exception as exc:  # the effect is committed; delivery is best effort
            log.warning("api_key_delivery_failed", key_id=issued.key_id, error=type(exc).__name__)

    # ------------------------------------------------------------------ failures

    def crash(self, name: str, key: str) -> None:
        """Simulate a process death at step ``name`` of ``key`` if a crash point names it (tests only)."""
        if self.crashpoints:
            crashpoint(self.crashpoints, name, key, exit_process=self.exit_on_crash)

    async def _transient(
        self, message: BillingMessage, fingerprint: str, kwargs: Any, delivery: Delivery, exc: Exception
    ) -> None:
        """A transient error: logged for a retry, or recorded as ``retries_exhausted`` at the last one."""
        if delivery.retries >= delivery.max_retries:
            try:
                await self.record_failure(
                    message.actor_name,
                    kwargs,
                    message,
                    delivery,
                    exc,
                    attempts=delivery.retries + 1,
                    event="retries_exhausted",
                    end_key=(fingerprint, "failed"),
                )
            except BillingError:
                # Dramatiq gives the message up; the key keeps its lease, so the
                # completer re-sends or ends it (db.deadlines) once it runs out
                pass
            return
        # one line; a traceback only for an exception we did not classify
        log.warning(
            "transient_error",
            error=type(exc).__name__,
            reason=str(exc),
            retries=delivery.retries,
            exc_info=None if isinstance(exc, BillingError) else exc,
        )
        mark_logged(exc)

    async def record_failure(
        self,
        actor_name: str,
        kwargs: Any,
        message: BillingMessage | None,
        delivery: Delivery,
        exc: BaseException,
        *,
        attempts: int,
        event: str = "message_failed",
        end_key: tuple[str, str] | None = None,
    ) -> None:
        """Record a failure in ``failed_messages`` and log it: one line, ``event``, whatever happens.

        The line (``message_failed`` at WARNING; ``retries_exhausted`` at
        ERROR) carries the error's code and reason, and a traceback only for
        an exception that is not a :class:`BillingError` (an unexpected one).
        Dramatiq does not log ``exc`` again (:func:`workers.logging.mark_logged`).
        With ``end_key``, the message's idempotency key is ended in the same
        transaction, so a key is never ``failed`` without its record.

        Parameters:
          kwargs: The arguments as received (any JSON value); stored escaped and redacted.
          message: The validated message, None when validation did not get that far.
          attempts: Deliveries so far (Dramatiq's retries + 1).
          event: ``message_failed`` or ``retries_exhausted``.
          end_key: ``(fingerprint, status)``: end ``message``'s key as ``failed``
            (a new delivery runs it again) or ``dead`` (poison); a completed key stays completed.

        Raises:
          DatabaseUnavailable: Nothing was recorded (PostgreSQL down or the
            connection lost; logged as ``could_not_record_failure``): the caller
            retries the delivery rather than drop the failure.
        """
        metrics.failure_recorded(actor_name, exc)
        code = exc.code if isinstance(exc, BillingError) else type(exc).__name__
        reason = exc.message if isinstance(exc, BillingError) else str(exc)
        (log.error if event == "retries_exhausted" else log.warning)(
            event, error=code, reason=reason, exc_info=None if isinstance(exc, BillingError) else exc
        )
        mark_logged(exc)
        try:
            stored_kwargs = json.loads(json.dumps(kwargs, default=repr))
        except (TypeError, ValueError):
            stored_kwargs = {"unserializable": repr(kwargs)[:2000]}
        if len(json.dumps(stored_kwargs)) > 64_000:
            stored_kwargs = {"truncated": json.dumps(stored_kwargs)[:2000]}
        try:
            async with transaction(self.engine) as conn:
                if end_key is not None and message is not None:
                    await money.fail_key(
                        conn, message.idempotency_key, end_key[0], end_key[1], _describe(exc)
                    )
                await money.record_failure(
                    conn,
                    message_id=delivery.message_id,
                    actor_name=actor_name if isinstance(actor_name, str) else repr(actor_name),
                    queue_name=delivery.queue_name or QUEUE_OF_ACTOR.get(actor_name, "unknown"),
                    kwargs=stored_kwargs,
                    idempotency_key=message.idempotency_key if message else None,
                    account_id=getattr(message, "account_id", None) if message else None,
                    error_type=exc.code if isinstance(exc, BillingError) else type(exc).__name__,
                    error_message=_describe(exc),
                    traceback="".join(tb.format_exception(exc)),
                    attempts=attempts,
                )
        except BillingError:
            log.error("could_not_record_failure", error=type(exc).__name__)
            raise

    async def record_undecodable(
        self, queue_name: str, redis_id: str, payload: bytes, error: BaseException
    ) -> None:
        """Record a Redis payload that is not a Dramatiq message (not JSON, wrong envelope) for operators.

        Stored in ``failed_messages`` as message id ``undecodable:{redis_id}``,
        actor ``(undecodable)``, error ``message_validation_error`` (never
        retried; ``billing ops resolve`` it), with the payload's first 2,000
        characters and its size in bytes.  Nothing else is written.

        Parameters:
          queue_name: The Redis queue it was fetched from.
          redis_id: Dramatiq's Redis message id (the key in the queue's ``.msgs`` hash).
          payload: The raw bytes.
          error: The decoder's exception.

        Raises:
          DatabaseUnavailable: It could not be recorded (the caller requeues it).
        """
        exc = MessageValidationError(
            f"undecodable payload ({len(payload):,} bytes): not a Dramatiq message: "
            f"{type(error).__name__}: {str(error)[:300]}"
        )
        metrics.failure_recorded("(undecodable)", exc)
        async with translate_errors(), self.autocommit.connect() as conn:
            await money.record_failure(
                conn,
                message_id=f"undecodable:{redis_id}",
                actor_name="(undecodable)",
                queue_name=queue_name,
                kwargs={"payload": payload[:2000].decode("utf-8", "replace"), "bytes": len(payload)},
                idempotency_key=None,
                account_id=None,
                error_type=exc.code,
                error_message=exc.message,
                traceback=None,
                attempts=1,
            )
        log.error(
            "undecodable_payload_recorded", queue=queue_name, redis_message_id=redis_id, bytes=len(payload)
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BillingError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
