"""The renewal scheduler: finds due subscriptions and enqueues their ``renew`` messages.

A pass (SPEC "Messages"):

1. takes a PostgreSQL advisory lock without waiting, so one scheduler scans
   at a time whatever the number of machines (a pass that finds the lock
   taken does nothing; a crashed scheduler's lock goes with its connection);
2. streams the due subscriptions through a server-side cursor, by index:
   ``active`` ones whose period ends within the lead time, and ``past_due``
   ones whose next dunning retry has come;
3. enqueues one ``renew`` per due subscription with the deterministic key
   ``renew:{subscription_id}:{period_start}`` (``...:retry:{n}`` for the
   n-th dunning retry), a batch per pipelined Redis round trip, and records
   each batch with its broker message ids in ``scheduled_renewals`` (one
   upsert per batch, on its own connection, while the next batch goes to
   Redis and the one after it is fetched).

The scheduler moves no money and decides nothing: two passes at once, a
pass repeated, or a message enqueued twice all send the same key, and the
``renew`` actor charges a period at most once under the subscription's row
lock.  A subscription stays due until its renewal commits.  A pass sends a
renewal it enqueued before again only once ``resend_after`` has passed and
the broker no longer holds that message (:meth:`BillingRedisBroker.held`:
processed, dead-lettered or lost): re-sent at every pass, a backlog gains a
copy of every due renewal per pass, faster than the workers drop copies,
and never drains.  A lost message costs ``resend_after``, never a period.
A message the broker has held for ``hold_at_most`` is sent again all the
same (a body left in Redis without its queue entry would hold a renewal
for good), one copy per ``hold_at_most``, well within the audit's renewal
deadline (1 h).
The next period of a catch-up, and the next dunning retry, are other
renewals and go out on the next pass.  Time comes from an injected clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import dramatiq
import structlog
import uuid_utils
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from db.engine import translate_errors
from db.money import BillingPolicy
from db.schedule import (
    DueRenewal,
    count_due,
    due_renewals,
    record_enqueued,
    release_scheduler_lock,
    try_scheduler_lock,
)
from tasks.messages import RenewMessage, renewal_kwargs

from .clock import Clock, SystemClock
from .owners import Completer, CompleterReport, Reconciler, ReconcilerReport
from .providers.base import PaymentProvider

__all__ = ["Scheduler", "PassReport"]

log = structlog.get_logger("scheduler")


@dataclass(frozen=True)
class PassReport:
    """What one pass did.

    Attributes:
      ran: False when another scheduler held the lock (nothing was scanned).
      renewals: ``renew`` messages enqueued for periods ending.
      retries: ``renew`` messages enqueued as dunning retries of past_due subscriptions.
      held: Due renewals not enqueued again because the broker still holds the last one sent.
      seconds: Wall time of the pass.
    """

    ran: bool
    renewals: int = 0
    retries: int = 0
    held: int = 0
    seconds: float = 0.0
    completer: CompleterReport | None = None
    reconciler: ReconcilerReport | None = None

    @property
    def enqueued(self) -> int:
        """All messages enqueued by the pass."""
        return self.renewals + self.retries


@dataclass(frozen=True)
class Sent:
    """What one batch's enqueue did: the renewals enqueued, their broker message ids (in order), and
    how many renewals of the batch were held back because the broker still holds the last one sent."""

    renewals: list[DueRenewal]
    broker_ids: list[str | None]
    held: int


class Scheduler:
    """Enqueues due renewals; see the module docstring for the rules.

    Built from the settings by :func:`workers.app.build_scheduler` (the
    composition root), which also gives it the payment provider its
    reconciler asks.

    Parameters:
      engine: Async engine on the billing database.
      broker: Dramatiq broker to enqueue on (:meth:`BillingRedisBroker.enqueue_many`
        is used when the broker has it, one ``enqueue`` per message otherwise).
      clock: Source of "now" (UTC); a FixedClock runs months in seconds.
      lead_time: Renew periods ending up to this long after now.
      batch_size: Subscriptions per cursor fetch and per pipelined enqueue.
      resend_after: A due renewal enqueued less than this long ago (scheduler
        clock) is not enqueued again, nor while the broker still holds it;
        ``timedelta(0)``: at every pass once its message is gone.
      hold_at_most: A renewal the broker has held this long since it was
        enqueued is enqueued again all the same.
      policy: The deadlines the completer and the reconciler apply.
      provider: The payment provider the reconciler asks about pending
        top-ups (None: no reconciliation in this scheduler's passes).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        broker: dramatiq.Broker,
        *,
        clock: Clock | None = None,
        lead_time: timedelta = timedelta(0),
        batch_size: int = 1_000,
        resend_after: timedelta = timedelta(minutes=5),
        hold_at_most: timedelta = timedelta(minutes=30),
        policy: BillingPolicy | None = None,
        provider: PaymentProvider | None = None,
    ) -> None:
        self.engine = engine
        self.broker = broker
        self.clock = clock or SystemClock()
        self.lead_time = lead_time
        self.batch_size = batch_size
        self.resend_after = resend_after
        self.hold_at_most = hold_at_most
        policy = policy or BillingPolicy()
        self.completer = Completer(engine, policy, self.clock)
        self.reconciler = Reconciler(engine, provider, policy, self.clock) if provider is not None else None

    async def run_pass(
        self,
        *,
        on_total: Callable[[int], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> PassReport:
        """Run one pass.

        Parameters:
          on_total: Called with the number of due renewals before enqueueing
            (costs one ``count(*)``; for a progress bar).
          on_batch: Called with the size of each enqueued batch.

        Raises:
          DatabaseUnavailable: PostgreSQL could not be reached.
          redis.RedisError: Redis could not be reached (the next pass sends everything again).
        """
        started = time.monotonic()
        now = self.clock.now()
        horizon = now + self.lead_time
        renewals = retries = held = 0
        scanned = await self._scan(now, horizon, on_total, on_batch)
        if scanned is not None:
            renewals, retries, held = scanned
        # the owners of the states that wait, after the scan (they take rows with
        # SKIP LOCKED, so every scheduler runs them, not only the one that scanned)
        completed = await self.completer.run_pass()
        reconciled = await self.reconciler.run_pass() if self.reconciler is not None else None
        report = PassReport(
            scanned is not None,
            renewals,
            retries,
            held,
            time.monotonic() - started,
            completer=completed,
            reconciler=reconciled,
        )
        log.info(
            "scheduler_pass",
            now=now.isoformat(),
            renewals=renewals,
            retries=retries,
            held=held,
            redriven=completed.redriven,
            ended=completed.ended,
            waits_released=completed.waits_released,
            owed_top_ups=completed.owed_top_ups,
            reconciled=reconciled.settled if reconciled is not None else None,
            seconds=round(report.seconds, 3),
        )
        return report

    async def _scan(
        self,
        now: datetime,
        horizon: datetime,
        on_total: Callable[[int], None] | None,
        on_batch: Callable[[int], None] | None,
    ) -> tuple[int, int, int] | None:
        """Enqueue what is due, under the scheduler lock: (renewals, retries, held), or None if another holds it."""
        counts = (0, 0, 0)
        resend_before = now - self.resend_after
        async with translate_errors(), self.engine.connect() as conn, self.engine.connect() as recorder:
            if not await try_scheduler_lock(conn):
                await conn.rollback()
                log.info("scheduler_pass_skipped", reason="another scheduler holds the lock")
                return None
            try:
                if on_total is not None:
                    on_total(await count_due(conn, now=now, horizon=horizon, resend_before=resend_before))
                # three batches in flight: one fetched from PostgreSQL, the one before it going
                # to Redis (in a thread), and the one before that into the record (its own connection)
                hold_since = now - self.hold_at_most
                sending: asyncio.Future[Sent] | None = None
                recording: asyncio.Future[None] | None = None
                batches = due_renewals(
                    conn, now=now, horizon=horizon, resend_before=resend_before, batch_size=self.batch_size
                )
                try:
                    async for batch in batches:
                        if sending is not None:
                            recording = await self._sent(sending, recording, recorder, now)
                            counts = self._count(sending.result(), counts, on_batch)
                        sending = asyncio.ensure_future(asyncio.to_thread(self._enqueue, batch, hold_since))
                    if sending is not None:
                        recording = await self._sent(sending, recording, recorder, now)
                        counts = self._count(sending.result(), counts, on_batch)
                    if recording is not None:
                        await recording
                finally:
                    # a failed pass leaves nothing running on the connections it is about to release
                    pending = [f for f in (sending, recording) if f is not None and not f.done()]
                    await asyncio.gather(*pending, return_exceptions=True)
            finally:
                await conn.rollback()
                await release_scheduler_lock(conn)
                await conn.commit()
        return counts

    async def _sent(
        self,
        sending: asyncio.Future[Sent],
        recording: asyncio.Future[None] | None,
        recorder: AsyncConnection,
        now: datetime,
    ) -> asyncio.Future[None]:
        """Once ``sending`` is enqueued and the record before it written, start recording it.

        Recorded after its enqueue and committed, so a failed enqueue records nothing.
        """
        sent = await sending
        if recording is not None:
            await recording
        return asyncio.ensure_future(self._record(recorder, sent, now))

    @staticmethod
    async def _record(recorder: AsyncConnection, sent: Sent, now: datetime) -> None:
        await record_enqueued(recorder, sent.renewals, sent.broker_ids, now)
        await recorder.commit()

    @staticmethod
    def _count(
        sent: Sent,
        counts: tuple[int, int, int],
        on_batch: Callable[[int], None] | None,
    ) -> tuple[int, int, int]:
        batch_retries = sum(1 for due in sent.renewals if due.retry)
        if on_batch is not None:
            on_batch(len(sent.renewals) + sent.held)
        renewals, retries, held = counts
        n = len(sent.renewals)
        return renewals + n - batch_retries, retries + batch_retries, held + sent.held

    def _enqueue(self, batch: list[DueRenewal], hold_since: datetime) -> Sent:
        """Enqueue each renewal of ``batch`` the broker no longer holds.

        A renewal enqueued after ``hold_since`` (``sent_as``, ``sent_at``) is
        sent again only when the broker says it is gone (processed,
        dead-lettered or lost); a broker that cannot say (no ``held``) gets it
        again, and so does one enqueued before ``hold_since``.
        """
        held_ids: set[str] = set()
        previous = [
            due.sent_as
            for due in batch
            if due.sent_as is not None and due.sent_at is not None and due.sent_at > hold_since
        ]
        held_by: Any = getattr(self.broker, "held", None)
        if previous and held_by is not None:
            held_ids = held_by(RenewMessage.queue_name, previous)
        todo = [due for due in batch if due.sent_as is None or due.sent_as not in held_ids]
        messages: list[dramatiq.Message[Any]] = [
            dramatiq.Message(
                queue_name=RenewMessage.queue_name,
                actor_name=RenewMessage.actor_name,
                args=(),
                kwargs=renewal_kwargs(due.subscription_id, due.period_start, due.retry),
                options={},
                message_id=str(uuid_utils.uuid4()),
            )
            for due in todo
        ]
        enqueue_many: Any = getattr(self.broker, "enqueue_many", None)
        if enqueue_many is not None:
            enqueued = enqueue_many(messages)
        else:
            enqueued = [self.broker.enqueue(message) for message in messages]
        return Sent(todo, [m.options.get("redis_message_id") for m in enqueued], len(batch) - len(todo))

    async def run_forever(self, *, interval: timedelta, stop: asyncio.Event) -> None:
        """Run a pass every ``interval`` until ``stop`` is set.

        A pass that fails (database or Redis down) is logged and the next one
        runs on time: everything due is enqueued again then.
        """
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.run_pass()
            except Exception as exc:  # noqa: BLE001 - keep scheduling; logged
                log.error("scheduler_pass_failed", error=type(exc).__name__, reason=str(exc))
            wait = max(0.0, interval.total_seconds() - (time.monotonic() - started))
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
            except TimeoutError:
                pass
