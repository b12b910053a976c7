"""The async SQLAlchemy engine on asyncpg, and the conversion of driver errors.

Driver errors are converted here, at the ``db/`` boundary, into the error
hierarchy of :mod:`tasks.errors` so that the retry policy reads off the type.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from tasks.errors import DatabaseUnavailable

from .config import asyncpg_url

__all__ = ["make_engine", "TRANSIENT_SQLSTATES", "is_transient", "translate_errors", "transaction"]

#: SQLSTATEs worth a retry: serialization failure, deadlock, lock timeout,
#: admin shutdown / terminated backend, crash shutdown, cannot connect now,
#: too many connections and the whole connection-exception class (08xxx).
TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"}


def make_engine(url: str, *, pool_size: int = 10, max_overflow: int = 5, echo: bool = False) -> AsyncEngine:
    """Create the async engine.

    Parameters:
      url: A ``postgresql://`` or ``postgresql+asyncpg://`` URL.
      pool_size: Connections kept open; size it to the worker's concurrency.
      max_overflow: Extra connections allowed under bursts.

    Returns:
      AsyncEngine: Bound to the event loop it is first used on.
    """
    return create_async_engine(
        asyncpg_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        # no pool_pre_ping: it costs a round trip per checkout, i.e. per
        # message; a dead connection fails the statement instead, which is a
        # transient error (retried) and SQLAlchemy invalidates the connection
        pool_recycle=1800,
        echo=echo,
    )


def _sqlstate(error: BaseException) -> str | None:
    orig = getattr(error, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None), error):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if code:
            return str(code)
    return None


def is_transient(error: BaseException) -> bool:
    """Whether a driver error is worth retrying (connection loss, deadlock, serialization...)."""
    if isinstance(error, (ConnectionError, OSError, TimeoutError)):
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        code = _sqlstate(error)
        if code and (code in TRANSIENT_SQLSTATES or code.startswith("08")):
            return True
        if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return True
    name = type(error).__name__
    return name in {"ConnectionDoesNotExistError", "InterfaceError", "ConnectionFailureError"}


@asynccontextmanager
async def translate_errors() -> AsyncIterator[None]:
    """Re-raise transient driver errors as :class:`DatabaseUnavailable` (``raise ... from``)."""
    try:
        yield
    except (sa_exc.DBAPIError, ConnectionError, OSError, TimeoutError) as exc:
        if is_transient(exc):
            raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}: {exc}") from exc
        raise


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One PostgreSQL transaction (READ COMMITTED); driver errors are translated."""
    async with translate_errors(), engine.begin() as conn:
        yield conn
