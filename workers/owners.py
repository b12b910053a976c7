"""The completer and the reconciler: the owners that move waiting states forward after their deadline.

Both run in every scheduler pass (:meth:`workers.scheduler.Scheduler.run_pass`),
on the scheduler's clock, and are safe with several schedulers running: what
they work on is taken with ``FOR UPDATE SKIP LOCKED`` or under a lease
(:mod:`db.deadlines`).  The messages they write go to the outbox, which the
workers' outbox sweeper relays (``BILLING_OUTBOX_SWEEP_AFTER_MS``).

* :class:`Completer` (rocket-rides-atomic's completer and reaper in one):
  ``processing`` keys past their lease are re-sent from the request the
  database kept, then ended as failed and recorded for operators; waits for
  funds whose top-up is gone are resumed; owed usage of an account with
  auto-top-up on and no top-up coming gets its top-up asked for.
* :class:`Reconciler`: top-ups still ``pending`` past their deadline are
  looked up at the provider under our provider idempotency key and settled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from db import deadlines
from db.engine import transaction, translate_errors
from db.money import BillingPolicy
from tasks.errors import BillingError

from .clock import Clock, SystemClock
from .providers.base import PaymentProvider

__all__ = ["Completer", "CompleterReport", "Reconciler", "ReconcilerReport"]

log = structlog.get_logger("owners")


@dataclass(frozen=True)
class CompleterReport:
    """What one completer pass did.

    Attributes:
      redriven: Stale keys re-sent from their stored request.
      ended: Stale keys ended as failed (recorded in ``failed_messages`` unless a renewal).
      waits_released: Waits for funds resumed because no top-up was coming.
      owed_top_ups: Auto-top-ups asked for to collect owed usage that no top-up was coming for.
    """

    redriven: int = 0
    ended: int = 0
    waits_released: int = 0
    owed_top_ups: int = 0


@dataclass
class Completer:
    """Re-drives or ends ``processing`` keys past their lease, and resumes waits with no live top-up.

    Parameters:
      engine: Async engine on the billing database.
      policy: ``key_lease`` and ``max_redrives``.
      clock: Source of "now" (UTC).
      batch_size: Keys and accounts handled per pass (the rest in the next pass).
    """

    engine: AsyncEngine
    policy: BillingPolicy = field(default_factory=BillingPolicy)
    clock: Clock = field(default_factory=SystemClock)
    batch_size: int = 500

    async def run_pass(self) -> CompleterReport:
        """One pass.

        Raises:
          DatabaseUnavailable: PostgreSQL could not be reached (the next pass does it).
        """
        now = self.clock.now()
        redriven = ended = released = 0
        async with translate_errors(), transaction(self.engine) as conn:
            for stale in await deadlines.claim_stale_keys(conn, now=now, limit=self.batch_size):
                if stale.request is not None and stale.redrives < self.policy.max_redrives:
                    await deadlines.redrive_key(conn, stale, now=now, policy=self.policy)
                    redriven += 1
                    log.warning(
                        "key_redriven",
                        idempotency_key=stale.key,
                        kind=stale.kind,
                        redrives=stale.redrives + 1,
                    )
                else:
                    reason = f"no delivery finished this key within its lease ({self.policy.key_lease}); " + (
                        f"re-sent {stale.redrives} times without finishing"
                        if stale.request is not None
                        else "the message is gone and the database does not know it"
                    )
                    await deadlines.end_key(conn, stale, now=now, reason=reason)
                    ended += 1
                    log.error("key_lease_expired", idempotency_key=stale.key, kind=stale.kind, reason=reason)
        async with translate_errors(), transaction(self.engine) as conn:
            accounts = await deadlines.orphaned_wait_accounts(conn, limit=self.batch_size)
        for account_id in accounts:
            async with translate_errors(), transaction(self.engine) as conn:
                resumed = await deadlines.release_orphaned_waits(
                    conn, account_id, now=now, policy=self.policy
                )
            if resumed:
                released += len(resumed)
                log.warning("waits_released", account_id=account_id, messages=len(resumed))
        owed_top_ups = 0
        async with translate_errors(), transaction(self.engine) as conn:
            owing = await deadlines.owed_accounts_without_top_up(
                conn, now=now, policy=self.policy, limit=self.batch_size
            )
        for account_id in owing:
            async with translate_errors(), transaction(self.engine) as conn:
                asked = await deadlines.request_owed_top_up(conn, account_id, now=now, policy=self.policy)
            if asked:
                owed_top_ups += 1
                log.info("owed_top_up_requested", account_id=account_id)
        return CompleterReport(redriven, ended, released, owed_top_ups)


@dataclass(frozen=True)
class ReconcilerReport:
    """What one reconciler pass did.

    Attributes:
      looked_up: Attempts looked up at the provider.
      settled: Settlements by state (``succeeded``, ``declined``, ``failed``, ``processing``).
      unanswered: Lookups the provider could not answer (tried again later).
    """

    looked_up: int = 0
    settled: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0


@dataclass
class Reconciler:
    """Settles top-up attempts still pending past their deadline from what the provider says.

    A charge the provider made is credited once (the credit's key is the
    attempt's); one it never made, or that ended without money, releases
    the waits, which then follow the past_due / grace rules; one it is still
    processing is looked at again every ``policy.processing_poll``.  An
    attempt with no charge found is settled as failed only once no charge
    request can still be on its way (the charge lease has run out, plus the
    provider's ``lookup_settle_delay``), and never while a newer charge
    request went out after the lookup.

    Parameters:
      engine: Async engine on the billing database.
      provider: The payment provider charges were made with.
      policy: ``processing_poll``, ``top_up_deadline``.
      clock: Source of "now" (UTC).
      relook: When an attempt taken but not settled (no answer) is due again.
      batch_size: Attempts per pass.
    """

    engine: AsyncEngine
    provider: PaymentProvider
    policy: BillingPolicy = field(default_factory=BillingPolicy)
    clock: Clock = field(default_factory=SystemClock)
    relook: timedelta = timedelta(minutes=5)
    batch_size: int = 100

    async def run_pass(self) -> ReconcilerReport:
        """One pass.

        Raises:
          DatabaseUnavailable: PostgreSQL could not be reached (the next pass does it).
        """
        now = self.clock.now()
        async with (
            translate_errors(),
            self.engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn,
        ):
            due = await deadlines.claim_due_attempts(
                conn, now=now, relook_at=now + self.relook, limit=self.batch_size
            )
        return await self.settle(due)

    async def settle(self, due: Sequence[deadlines.DueAttempt]) -> ReconcilerReport:
        """Look up and settle attempts already taken (by :meth:`run_pass`, or by ``billing reconcile --settle``).

        Parameters:
          due: Attempts taken with a reconciler lease (``reconcile_after`` moved to a relook time).

        Raises:
          DatabaseUnavailable: PostgreSQL could not be reached.
        """
        settled: Counter[str] = Counter()
        unanswered = 0
        for attempt in due:
            looked_up_at = self.clock.now()
            try:
                found = await self.provider.lookup(
                    idempotency_key=attempt.intent.provider_idempotency_key,
                    charge_id=attempt.provider_charge_id,
                )
            except BillingError as exc:
                unanswered += 1
                log.warning(
                    "reconcile_unanswered",
                    attempt_id=attempt.intent.attempt_id,
                    error=exc.code,
                    reason=exc.message,
                )
                continue
            state, reason = found.state, found.decline_code
            if state == "not_found":
                last_request = attempt.charge_lease_until or attempt.created_at
                if looked_up_at < last_request + self.provider.lookup_settle_delay:
                    continue  # the provider may not show it yet: the next look decides
                state = "failed"
                reason = f"reconciliation: the {self.provider.name} provider has no charge under our key"
            async with translate_errors(), transaction(self.engine) as conn:
                effect = await deadlines.settle_attempt(
                    conn,
                    attempt,
                    state=state,
                    charge_id=found.charge_id,
                    reason=reason,
                    looked_up_at=looked_up_at,
                    now=self.clock.now(),
                    policy=self.policy,
                )
            if effect is not None:
                settled[state] += 1
                log.warning(
                    "top_up_reconciled",
                    attempt_id=attempt.intent.attempt_id,
                    account_id=attempt.intent.account_id,
                    state=state,
                    outcome=effect.outcome,
                )
        return ReconcilerReport(len(due), dict(settled), unanswered)
