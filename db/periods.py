"""Billing-period arithmetic: calendar intervals in UTC with an anchor day.

Period ``n`` of a subscription ends at ``anchor + n * interval``, computed
from the anchor every time (never from the previous end), so a monthly
subscription anchored on Jan 31 renews on Feb 28 (29 in a leap year), then
Mar 31, then Apr 30 (the usual rule of Stripe and of ``dateutil.relativedelta``).
"""

from __future__ import annotations

from datetime import UTC, datetime

from dateutil.relativedelta import relativedelta

from .errors import InvalidValue

__all__ = ["period_bounds", "top_up_period"]


def _offset(interval: str, count: int) -> relativedelta:
    if interval == "month":
        return relativedelta(months=count)
    if interval == "day":
        return relativedelta(days=count)
    raise InvalidValue(f"unknown interval {interval!r}")


def period_bounds(
    anchor: datetime, interval: str, interval_count: int, index: int
) -> tuple[datetime, datetime]:
    """Start and end (UTC) of period ``index`` (0-based) of a subscription anchored at ``anchor``.

    Parameters:
      anchor: The start of period 0 (timezone-aware).
      interval: ``month`` or ``day``.
      interval_count: Intervals per period (>= 1).
      index: The period number, 0 for the first.

    Raises:
      db.errors.InvalidValue: Unknown interval (a ``ValueError``).
    """
    anchor = anchor.astimezone(UTC)
    start = anchor + _offset(interval, interval_count * index)
    end = anchor + _offset(interval, interval_count * (index + 1))
    return start, end


def top_up_period(now: datetime) -> str:
    """The auto-top-up accounting period of ``now``: its calendar month in UTC, ``YYYY-MM``."""
    return now.astimezone(UTC).strftime("%Y-%m")
