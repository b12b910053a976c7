"""Injected time: every "now" of the money path comes from a clock object."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "SystemClock", "FixedClock", "OffsetClock", "write_clock_offset"]


class Clock(Protocol):
    """Gives the current time as an aware UTC datetime."""

    def now(self) -> datetime: ...


class SystemClock:
    """The wall clock, in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class FixedClock:
    """A clock that moves only when told (tests and accelerated demos)."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("FixedClock needs an aware datetime")
        self._now = start.astimezone(UTC)

    def now(self) -> datetime:
        return self._now

    def set(self, when: datetime) -> None:
        self._now = when.astimezone(UTC)

    def advance(self, delta: timedelta) -> datetime:
        self._now += delta
        return self._now


class OffsetClock:
    """The wall clock plus an offset read from a file: the chaos run's injected clock (harness only).

    ``make chaos`` (:mod:`workers.chaos`) makes time jump for its worker and
    scheduler processes while they run: each of them reads "now" from an
    ``OffsetClock`` on the same file (``BILLING_CHAOS_CLOCK_FILE``, read by
    :mod:`workers.chaos_worker` only, never by production code), and the
    runner writes a new offset (milliseconds, one integer) with
    :func:`write_clock_offset`.  The file is read again whenever it changes
    (its inode and ``st_mtime_ns``); a missing or unreadable file is an offset of 0.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._stamp: tuple[int, int, int] | None = None
        self._offset = timedelta(0)

    @property
    def offset(self) -> timedelta:
        try:
            st = os.stat(self.path)
        except OSError:
            return self._offset
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                with open(self.path) as f:
                    self._offset = timedelta(milliseconds=int(f.read().strip() or 0))
                self._stamp = stamp
            except (OSError, ValueError):
                pass  # half written: the next read takes it
        return self._offset

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


def write_clock_offset(path: str | os.PathLike[str], offset: timedelta) -> None:
    """Set the offset of every :class:`OffsetClock` on ``path`` (atomically: a rename)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        f.write(str(int(offset / timedelta(milliseconds=1))))
    os.replace(tmp, path)
