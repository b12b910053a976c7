"""Calendar periods in UTC with an anchor day."""

from __future__ import annotations

from datetime import UTC, datetime

from db.periods import period_bounds, top_up_period


def test_monthly_from_jan_31_clamps_to_month_end_and_returns_to_the_anchor_day():
    anchor = datetime(2027, 1, 31, 12, tzinfo=UTC)
    ends = [period_bounds(anchor, "month", 1, i)[1] for i in range(3)]
    assert [e.date().isoformat() for e in ends] == ["2027-02-28", "2027-03-31", "2027-04-30"]


def test_leap_year_february_has_29_days():
    anchor = datetime(2028, 1, 31, tzinfo=UTC)
    assert period_bounds(anchor, "month", 1, 0)[1] == datetime(2028, 2, 29, tzinfo=UTC)


def test_consecutive_periods_touch():
    anchor = datetime(2026, 11, 30, 8, 30, tzinfo=UTC)
    for interval, count in (("month", 1), ("month", 3), ("day", 1), ("day", 7)):
        for i in range(24):
            assert (
                period_bounds(anchor, interval, count, i)[1]
                == period_bounds(anchor, interval, count, i + 1)[0]
            )


def test_day_intervals():
    anchor = datetime(2026, 2, 27, tzinfo=UTC)
    assert period_bounds(anchor, "day", 2, 1) == (
        datetime(2026, 3, 1, tzinfo=UTC),
        datetime(2026, 3, 3, tzinfo=UTC),
    )


def test_top_up_period_is_the_utc_calendar_month():
    assert top_up_period(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == "2026-12"
