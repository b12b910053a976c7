"""BillingService: runs one message through the idempotent money path.

For every delivery (SPEC "Processing rules"):

1. validate the keyword arguments against the contract (a malformed message
   is recorded for operators and never retried);
2. claim the idempotency key in one autocommit statement, which also counts
   the delivery (bounding poison messages) and returns a stored outcome for
   a repeated key without touching money; the same key with other
   arguments is an idempotency conflict: recorded, never applied;
3. run the effect in one transaction: lock the key row, lock the account,
   check the balance, write the ledger and the balance together, write
   follow-up messages to the outbox, store the outcome, commit;
4. after commit, relay the outbox to Redis and deliver a new API key's
   plaintext on the pub/sub channel; a crash before this loses nothing, the
   outbox sweeper relays what was left.

``auto_top_up`` splits step 3 into recoverable phases around the provider
call (record intent / call with the provider's idempotency key / record the
result and credit the ledger), so a crash between any two of them neither
loses the credit nor charges twice.
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
from db.money import BillingPolicy, Effect, IssuedKey, OutboxMessage
from tasks.errors import (
    BillingError,
    IdempotencyConflict,
    MessageAuthenticationFailed,
    MessageValidationError,
    PermanentError,
    ProviderRejected,
    TooManyDeliveries,
)
from tasks.messages import (
    QUEUE_OF_ACTOR,
    AutoTopUpMessage,
    BillingMessage,
    RenewMessage,
    RevokeKeyMessage,
    SubscribeMessage,
    check_json_text,
    validate_message,
)
from tasks.signing import SigningKeys

from . import metrics
from .clock import Clock, SystemClock
from .crash import FAST_PATH_CRASHPOINTS, crashpoint
from .logging import mark_logged
from .providers.base import PaymentProvider

__all__ = ["BillingService", "Delivery", "RenewalBatcher", "API_KEY_CHANNEL"]

log = structlog.get_logger("billing")

#: Redis pub/sub channel on which a newly issued API key's plaintext is
#: published once, after commit, **only when no public key is configured**
#: for its account (the old, lossy delivery; the worker warns at start-up).
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
    max_batch: int = 64
    max_batches_in_flight: int = 1

    def __post_init__(self) -> None:
        self.autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._renewals = RenewalBatcher(
            self, max_batch=self.max_batch, max_in_flight=self.max_batches_in_flight
        )

    # ------------------------------------------------------------------ entry point

    async def handle(self, actor_name: str, kwargs: Any, delivery: Delivery) -> dict[str, Any]:
        """Process one delivery of ``actor_name`` with ``kwargs``.

        Returns:
          dict: The stored outcome (``{"outcome": ..., ...}``); a repeated key
          returns the first delivery's outcome with ``"duplicate": True``.

        Raises:
          PermanentError: Recorded in ``failed_messages``; not to be retried.
          TransientError: To be retried with backoff (recorded once retries are exhausted).
        """
        structlog.contextvars.bind_contextvars(message_id=delivery.message_id, actor=actor_name)
        try:
            # what no JSON text can hold (a lone surrogate, NaN) first: it has no canonical form
            check_json_text(actor_name, kwargs)
            if self.signing_keys is not None:
                problem = self.signing_keys.verify(
                    actor_name, delivery.message_id, kwargs, delivery.signature
                )
                if problem is not None:
                    raise MessageAuthenticationFailed(problem)
            message = validate_message(actor_name, kwargs, text_checked=True)
        except (MessageValidationError, MessageAuthenticationFailed) as exc:
            # recorded and logged (one message_failed line) by record_failure
            await self.record_failure(actor_name, kwargs, None, delivery, exc, attempts=delivery.retries + 1)
            raise
        account_id = getattr(message, "account_id", None)
        structlog.contextvars.bind_contextvars(idempotency_key=message.idempotency_key, account_id=account_id)
        fingerprint = message.fingerprint()
        try:
            fast: dict[str, Any] | None = None
            if (
                isinstance(message, RenewMessage)
                and self.renew_fast_path
                # a simulated crash at one of the Python path's steps needs that path
                and not any(
                    f in message.idempotency_key
                    for name, f in self.crashpoints.items()
                    if name not in FAST_PATH_CRASHPOINTS
                )
            ):
                claim, fast = await self._renewals.submit(message, fingerprint, delivery.message_id)
            else:
                async with translate_errors(), self.autocommit.connect() as conn:
                    claim = await money.claim_key(
                        conn,
                        key=message.idempotency_key,
                        kind=actor_name,
                        fingerprint=fingerprint,
                        account_id=account_id,
                        message_id=delivery.message_id,
                        lease_expires_at=self.clock.now() + self.policy.key_lease,
                        request=money.message_request(actor_name, message.queue_name, message.kwargs()),
                    )
            if claim.conflict:
                metrics.idempotency_conflict(actor_name)
                raise IdempotencyConflict(
                    f"idempotency key {message.idempotency_key!r} was used before with different arguments"
                )
            if claim.status == "completed":
                log.info("duplicate_suppressed", outcome=(claim.result or {}).get("outcome"))
                metrics.duplicate_suppressed(actor_name)
                return {**(claim.result or {}), "duplicate": True}
            if claim.status == "waiting_for_funds":
                # a re-send (the scheduler's next pass) of a key that waits for a
                # top-up: not a delivery; the top-up settling resumes it once
                log.info("waiting_for_funds", outcome=(claim.result or {}).get("outcome"))
                return {**(claim.result or {}), "waiting": True}
            if claim.attempts > self.max_deliveries:
                raise TooManyDeliveries(
                    f"delivered {claim.attempts} times without finishing (limit {self.max_deliveries})"
                )
            if fast is not None:
                result = fast
                if not fast.get("duplicate"):
                    metrics.effect_committed(actor_name, Effect(fast["outcome"], fast))
                    structlog.contextvars.bind_contextvars(account_id=fast.get("account_id"))
            elif isinstance(message, AutoTopUpMessage):
                result = await self._auto_top_up(message)
            else:
                result = await self._apply(message)
        except PermanentError as exc:
            if not isinstance(exc, IdempotencyConflict):
                status = "dead" if isinstance(exc, TooManyDeliveries) else "failed"
                await self._mark_key(message, fingerprint, status, exc)
            await self.record_failure(
                actor_name, kwargs, message, delivery, exc, attempts=delivery.retries + 1
            )
            raise
        except Exception as exc:
            if delivery.retries >= delivery.max_retries:
                await self._mark_key(message, fingerprint, "failed", exc)
                await self.record_failure(
                    actor_name,
                    kwargs,
                    message,
                    delivery,
                    exc,
                    attempts=delivery.retries + 1,
                    event="retries_exhausted",
                )
            else:
                # one line; a traceback only for an exception we did not classify
                log.warning(
                    "transient_error",
                    error=type(exc).__name__,
                    reason=str(exc),
                    retries=delivery.retries,
                    exc_info=None if isinstance(exc, BillingError) else exc,
                )
                mark_logged(exc)
            raise
        if result.get("duplicate"):  # completed by a concurrent delivery (seen under the key's lock)
            metrics.duplicate_suppressed(actor_name)
            log.info("duplicate_suppressed", outcome=result.get("outcome"))
        elif result.get("waiting"):  # left waiting for funds by a concurrent delivery (under the lock)
            log.info("waiting_for_funds", outcome=result.get("outcome"))
        else:
            log.info("message_processed", outcome=result.get("outcome"))
        return result

    # ------------------------------------------------------------------ effects

    async def _apply(self, message: BillingMessage) -> dict[str, Any]:
        key = message.idempotency_key
        async with transaction(self.engine) as conn:
            if (stored := await money.lock_key(conn, key)) is not None:
                return stored
            now = self.clock.now()
            effect: Effect
            if isinstance(message, SubscribeMessage):
                effect = await money.apply_subscribe(conn, message, now, self.policy)
            elif isinstance(message, RenewMessage):
                effect = await money.apply_renew(conn, message, now, self.policy)
            elif isinstance(message, RevokeKeyMessage):
                effect = await money.apply_revoke_key(conn, message, now)
            else:  # pragma: no cover - validate_message knows only four models
                raise MessageValidationError(f"no effect for {message.actor_name}")
            await money.record_effect(conn, key, effect, now)
            self._crash("before_commit", key)
        metrics.effect_committed(message.actor_name, effect)
        self._crash("after_commit", key)
        if "account_id" in effect.result:  # renew and revoke_key learn it from the database
            structlog.contextvars.bind_contextvars(account_id=effect.result["account_id"])
        await self._after_commit(effect)
        return effect.stored_result()

    async def _auto_top_up(self, message: AutoTopUpMessage) -> dict[str, Any]:
        key = message.idempotency_key
        # phase 1: record the attempt and the provider's idempotency key
        async with transaction(self.engine) as conn:
            if (stored := await money.lock_key(conn, key)) is not None:
                return stored
            now = self.clock.now()
            begun = await money.begin_top_up(conn, message, now, self.policy)
            if isinstance(begun, Effect):
                await money.record_effect(conn, key, begun, now)
        if isinstance(begun, Effect):
            metrics.effect_committed(message.actor_name, begun)
            await self._after_commit(begun)
            return begun.stored_result()
        intent = begun
        self._crash("after_top_up_intent", key)
        # phase 2: the provider call, alone, with a key derived from our row id,
        # under a charge lease (never past the provider's key window)
        state, charge_id, reason = "", None, None  # "": no answer from the provider in this delivery
        if intent.status == "pending":
            async with translate_errors(), self.autocommit.connect() as conn:
                permitted = await money.take_charge_lease(
                    conn,
                    intent,
                    now=self.clock.now(),
                    key_window=self.provider.key_window,
                    policy=self.policy,
                )
            if permitted:
                try:
                    charge = await self.provider.charge(
                        amount_micros=intent.amount_micros,
                        currency=intent.currency,
                        payment_method_ref=intent.payment_method_ref,
                        idempotency_key=intent.provider_idempotency_key,
                    )
                except ProviderRejected as exc:
                    # the provider refused the request itself: nothing was charged, nothing will be
                    state, reason = "failed", exc.message
                else:
                    state, charge_id, reason = charge.state, charge.charge_id, charge.decline_code
        self._crash("after_provider_charge", key)
        # phase 3: record the result, credit the ledger, resume waiting work
        async with transaction(self.engine) as conn:
            if (stored := await money.lock_key(conn, key)) is not None:
                return stored
            now = self.clock.now()
            # state "unknown": no charge request could go out (settled meanwhile, past the
            # key window, or processing at the provider): the stored state, or the reconciler's turn
            effect = await money.finish_top_up(
                conn,
                intent,
                state=state or "unknown",
                charge_id=charge_id,
                reason=reason,
                now=now,
                policy=self.policy,
            )
            assert effect is not None
            await money.record_effect(conn, key, effect, now)
            self._crash("before_commit", key)
        metrics.effect_committed(message.actor_name, effect)
        self._crash("after_commit", key)
        await self._after_commit(effect)
        return effect.stored_result()

    # ------------------------------------------------------------------ after commit

    async def _after_commit(self, effect: Effect) -> None:
        """Deliver a new key and relay the outbox; the effect is committed, so nothing here fails the message.

        A relay that fails leaves its rows in the outbox, where the sweeper of
        any worker picks them up (``outbox_sweep_after_ms``).
        """
        if effect.issued_key is not None:
            await self._deliver_key(effect.issued_key)
        if effect.outbox and self.broker is not None:
            try:
                await self.relay(effect.outbox)
            except Exception as exc:  # noqa: BLE001 - committed; the sweeper relays it
                log.warning("outbox_relay_deferred", error=type(exc).__name__, messages=len(effect.outbox))

    async def relay(self, messages: list[OutboxMessage]) -> None:
        """Enqueue committed outbox messages on Redis, then delete them from the outbox.

        A crash between the two sends them again later (the sweeper), with the
        same message id and idempotency key: harmless.
        """
        await self._enqueue(messages)
        async with translate_errors(), self.autocommit.connect() as conn:
            await money.delete_outbox(conn, [m.message_id for m in messages])

    async def _enqueue(self, messages: list[OutboxMessage]) -> None:
        """Enqueue outbox messages on the broker (off the event loop), keeping their message ids."""
        assert self.broker is not None
        broker = self.broker

        def enqueue_all() -> None:
            for m in messages:
                broker.enqueue(
                    dramatiq.Message(
                        queue_name=m.queue_name,
                        actor_name=m.actor_name,
                        args=(),
                        kwargs=m.kwargs,
                        options={},
                        message_id=m.message_id,
                    )
                )

        await asyncio.to_thread(enqueue_all)

    async def sweep_outbox(self, *, older_than_s: float, limit: int = 500) -> int:
        """Relay outbox messages a dead worker left behind. Returns how many were relayed."""
        async with transaction(self.engine) as conn:
            stale = await money.claim_stale_outbox(conn, older_than_s=older_than_s, limit=limit)
            if stale:
                await self._enqueue(stale)
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

    def _crash(self, name: str, key: str) -> None:
        if self.crashpoints:
            crashpoint(self.crashpoints, name, key, exit_process=self.exit_on_crash)

    async def _mark_key(
        self, message: BillingMessage, fingerprint: str, status: str, exc: BaseException
    ) -> None:
        try:
            async with translate_errors(), self.autocommit.connect() as conn:
                await money.fail_key(conn, message.idempotency_key, fingerprint, status, _describe(exc))
        except BillingError:
            log.error("could_not_mark_key", status=status)

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
    ) -> None:
        """Record a failure in ``failed_messages`` and log it: one line, ``event``, whatever happens.

        The line (``message_failed`` at WARNING; ``retries_exhausted`` at
        ERROR) carries the error's code and reason, and a traceback only for
        an exception that is not a :class:`BillingError` (an unexpected one).
        Dramatiq does not log ``exc`` again (:func:`workers.logging.mark_logged`).
        A failure that cannot be recorded (PostgreSQL down) is logged as such.

        Parameters:
          kwargs: The arguments as received (any JSON value); stored escaped and redacted.
          message: The validated message, None when validation did not get that far.
          attempts: Deliveries so far (Dramatiq's retries + 1).
          event: ``message_failed`` or ``retries_exhausted``.
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
            async with translate_errors(), self.autocommit.connect() as conn:
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


class RenewalBatcher:
    """Group commit for ``renew``: claims, then applies, the renewals that arrive together, in two statements.

    Each of a worker's threads hands its renewal to the process's event
    loop; while one batch is at PostgreSQL the next ones gather here.  A
    batch costs two round trips and two commits whatever its size: one
    autocommit statement claims every key (:func:`db.money.claim_keys`,
    committed first, so deliveries are counted even if the effect never
    commits), one applies every plain renewal whose claim allows it
    (:func:`db.money.renew_fast_batch`, each in its own subtransaction).
    Every message keeps its own key, outcome and errors: a renewal that is
    not plain (short funds, past_due, cancel at period end, catch-up) or
    failed comes back as None and takes the Python path alone; a batch that
    fails as a whole (PostgreSQL unreachable) fails each of its messages
    with the same transient error, to be retried.  A key that is already in
    the forming batch waits for the next one (one statement cannot claim a
    key twice).  Idle, a renewal goes alone at once: no added latency.

    Parameters:
      service: The service (engine, clock, max deliveries).
      max_batch: Most renewals per batch.
    """

    def __init__(self, service: BillingService, *, max_batch: int = 64, max_in_flight: int = 1) -> None:
        self.service = service
        self.max_batch = max(1, max_batch)
        self.max_in_flight = max(1, max_in_flight)
        self._waiting: list[tuple[RenewMessage, str, str, asyncio.Future[Any]]] = []
        self._in_flight = 0
        #: Batches run, the largest one, and renewals applied by the fast path (for tests and profiles).
        self.batches = 0
        self.largest_batch = 0
        self.applied = 0
        #: Why renewals took the Python path instead: reason -> count.
        self.fallbacks: dict[str, int] = {}

    async def submit(
        self, message: RenewMessage, fingerprint: str, message_id: str
    ) -> tuple[money.ClaimedKey, dict[str, Any] | None]:
        """Claim ``message``'s key and apply it if plain; returns its claim and its outcome (None: not applied).

        Raises:
          DatabaseUnavailable: The batch could not reach PostgreSQL (transient).
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((message, fingerprint, message_id, future))
        self._start_batches()
        result: tuple[money.ClaimedKey, dict[str, Any] | None] = await future
        return result

    def _start_batches(self) -> None:
        """Send what is waiting, in batches, while fewer than ``max_in_flight`` batches are at PostgreSQL."""
        while self._waiting and self._in_flight < self.max_in_flight:
            batch: list[tuple[RenewMessage, str, str, asyncio.Future[Any]]] = []
            later: list[tuple[RenewMessage, str, str, asyncio.Future[Any]]] = []
            keys: set[str] = set()
            for item in self._waiting:
                if len(batch) < self.max_batch and item[0].idempotency_key not in keys:
                    batch.append(item)
                    keys.add(item[0].idempotency_key)
                else:
                    later.append(item)
            self._waiting = later
            self._in_flight += 1
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            asyncio.ensure_future(self._send(batch))

    async def _send(self, batch: list[tuple[RenewMessage, str, str, asyncio.Future[Any]]]) -> None:
        try:
            outcomes = await self._run([(m, f, i) for m, f, i, _ in batch])
        except BaseException as exc:  # noqa: BLE001 - each message of the batch gets the batch's error
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for message, _, _, future in batch:
                if not future.done():
                    future.set_result(outcomes[message.idempotency_key])
        finally:
            self._in_flight -= 1
            self._start_batches()

    async def _run(
        self, batch: list[tuple[RenewMessage, str, str]]
    ) -> dict[str, tuple[money.ClaimedKey, dict[str, Any] | None]]:
        service = self.service
        async with translate_errors(), service.autocommit.connect() as conn:
            claims = await money.claim_keys(
                conn,
                [money.KeyClaim(m.idempotency_key, "renew", f, None, i) for m, f, i in batch],
                lease_expires_at=service.clock.now() + service.policy.key_lease,
            )
            to_apply = [
                m
                for m, _, _ in batch
                if not (c := claims[m.idempotency_key]).conflict
                and c.status not in ("completed", "waiting_for_funds")
                and c.attempts <= service.max_deliveries
            ]
            for m, _, _ in batch:  # claimed (committed), nothing applied
                service._crash("fast_after_claim", m.idempotency_key)
            applied = await money.renew_fast_batch(conn, to_apply, service.clock.now()) if to_apply else {}
        for m, _, _ in batch:  # applied (committed), no delivery told
            service._crash("fast_after_apply", m.idempotency_key)
        outcomes: dict[str, tuple[money.ClaimedKey, dict[str, Any] | None]] = {}
        for m, _, _ in batch:
            result = applied.get(m.idempotency_key)
            if result is not None and "fallback" in result:
                self.fallbacks[result["fallback"]] = self.fallbacks.get(result["fallback"], 0) + 1
                if (
                    result["fallback"] == "error"
                ):  # e.g. a deadlock between batches: the Python path retries it
                    log.info(
                        "renew_fast_path_fallback", idempotency_key=m.idempotency_key, error=result["error"]
                    )
                result = None
            elif result is not None and not result.get("duplicate"):
                self.applied += 1
            outcomes[m.idempotency_key] = (claims[m.idempotency_key], result)
        return outcomes


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BillingError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
