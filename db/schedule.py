"""The scheduler's SQL: which subscriptions are due, and the lock that lets one scheduler scan at a time.

The scheduler never moves money: it enqueues ``renew`` messages and records
what it enqueued (``scheduled_renewals``), and the ``renew`` actor decides,
under the subscription's row lock, whether a period is charged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "DueRenewal",
    "SCHEDULER_LOCK_ID",
    "try_scheduler_lock",
    "release_scheduler_lock",
    "due_renewals",
    "count_due",
    "record_enqueued",
]

#: PostgreSQL advisory lock key held by the scheduler that is scanning
#: (``hashtext('billing-queue:scheduler')`` fixed as a constant).
SCHEDULER_LOCK_ID = 7_240_113_905_521_370_131


@dataclass(frozen=True)
class DueRenewal:
    """A renewal to enqueue.

    Attributes:
      subscription_id: The subscription.
      period_start: Start of the unpaid period (its current period end), UTC.
      retry: 0 for the renewal at period end, n for the n-th dunning retry of a past_due one.
      sent_as: The broker message id this renewal was last enqueued under
        (:func:`record_enqueued`), or None if it never was (or the broker gave none).
      sent_at: When it was last enqueued (scheduler clock, UTC), or None.
    """

    subscription_id: str
    period_start: datetime
    retry: int
    sent_as: str | None = None
    sent_at: datetime | None = None


# Two index scans (subscriptions_renewal_due, subscriptions_dunning_due):
# active subscriptions whose period ends within the lead time, and past_due
# ones whose next dunning retry has come.  A subscription set to cancel at
# period end is due at its period end, not before: the renewal that cancels
# it must not take paid time away (it is the owner of that cancel).  The
# scheduler's record of the same period and retry (``scheduled_renewals``)
# comes along: a renewal enqueued after ``resend_before`` is left out, and
# one enqueued before it brings the broker message id to look for.
_DUE = """
    SELECT s.id, s.current_period_end AS period_start, 0 AS retry, r.broker_message_id AS sent_as,
           r.enqueued_at AS sent_at
    FROM subscriptions s
    LEFT JOIN scheduled_renewals r
      ON r.subscription_id = s.id AND r.period_start = s.current_period_end AND r.retry = 0
    WHERE s.status = 'active' AND s.current_period_end <= :horizon
      AND (NOT s.cancel_at_period_end OR s.current_period_end <= :now)
      AND (r.enqueued_at IS NULL OR r.enqueued_at <= :resend_before)
    UNION ALL
    SELECT s.id, s.current_period_end AS period_start, s.dunning_attempts + 1 AS retry,
           r.broker_message_id AS sent_as, r.enqueued_at AS sent_at
    FROM subscriptions s
    LEFT JOIN scheduled_renewals r
      ON r.subscription_id = s.id AND r.period_start = s.current_period_end AND r.retry = s.dunning_attempts + 1
    WHERE s.status = 'past_due' AND s.next_retry_at <= :now
      AND (r.enqueued_at IS NULL OR r.enqueued_at <= :resend_before)
"""

# The renewals of one enqueued batch, as the scheduler's record (one row per subscription).
_RECORD_ENQUEUED = """
    INSERT INTO scheduled_renewals AS r (subscription_id, period_start, retry, enqueued_at, broker_message_id)
    SELECT e.id, e.period_start, e.retry, :enqueued_at, e.sent_as
    FROM unnest(CAST(:ids AS text[]), CAST(:period_starts AS timestamptz[]), CAST(:retries AS integer[]),
                CAST(:sent_as AS text[]))
         AS e(id, period_start, retry, sent_as)
    ON CONFLICT (subscription_id) DO UPDATE
    SET period_start = EXCLUDED.period_start, retry = EXCLUDED.retry, enqueued_at = EXCLUDED.enqueued_at,
        broker_message_id = EXCLUDED.broker_message_id
"""


async def try_scheduler_lock(conn: AsyncConnection) -> bool:
    """Take the scheduler's session-level advisory lock on ``conn`` without waiting.

    Returns False when another scheduler (any process, any machine) holds it.
    The lock is released by :func:`release_scheduler_lock` or when the
    connection closes (a crashed scheduler cannot keep it).
    """
    row = await conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": SCHEDULER_LOCK_ID})
    return bool(row.scalar_one())


async def release_scheduler_lock(conn: AsyncConnection) -> None:
    """Release the lock taken by :func:`try_scheduler_lock` on the same connection."""
    await conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": SCHEDULER_LOCK_ID})


async def count_due(
    conn: AsyncConnection, *, now: datetime, horizon: datetime, resend_before: datetime
) -> int:
    """How many renewals :func:`due_renewals` would yield (for a progress bar)."""
    row = await conn.execute(
        text(f"SELECT count(*) FROM ({_DUE}) due"),
        {"now": now, "horizon": horizon, "resend_before": resend_before},
    )
    return int(row.scalar_one())


async def due_renewals(
    conn: AsyncConnection,
    *,
    now: datetime,
    horizon: datetime,
    resend_before: datetime,
    batch_size: int = 1000,
) -> AsyncIterator[list[DueRenewal]]:
    """Stream due renewals in batches through a server-side cursor (memory flat at any count).

    Parameters:
      now: The scheduler clock's time (UTC); dunning retries due at or before it.
      horizon: ``now`` plus the lead time; renewals of periods ending at or before it.
      resend_before: Leave out a renewal :func:`record_enqueued` recorded after
        this time (UTC) for the same period and retry; ``now`` leaves out none.
        A renewal recorded before it comes with its ``sent_as`` and ``sent_at``.
      batch_size: Rows fetched per round trip.
    """
    result = await conn.stream(
        text(_DUE).execution_options(yield_per=batch_size),
        {"now": now, "horizon": horizon, "resend_before": resend_before},
    )
    async for rows in result.partitions(batch_size):
        yield [DueRenewal(r.id, r.period_start, int(r.retry), r.sent_as, r.sent_at) for r in rows]


async def record_enqueued(
    conn: AsyncConnection, batch: list[DueRenewal], broker_ids: list[str | None], enqueued_at: datetime
) -> None:
    """Record that ``batch`` was enqueued at ``enqueued_at`` (UTC), each under its broker message id.

    One statement; the caller commits.

    Raises:
      sqlalchemy.exc.DBAPIError: PostgreSQL refused or could not be reached.
    """
    if batch:
        await conn.execute(
            text(_RECORD_ENQUEUED),
            {
                "ids": [d.subscription_id for d in batch],
                "period_starts": [d.period_start for d in batch],
                "retries": [d.retry for d in batch],
                "sent_as": broker_ids,
                "enqueued_at": enqueued_at,
            },
        )
