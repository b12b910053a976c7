"""The async SQLAlchemy engine on asyncpg, and the conversion of driver errors.

Driver errors are converted here, at the ``db/`` boundary, into the error
hierarchy of :mod:`tasks.errors` so that the retry policy reads off the type.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from tasks.errors import BillingError, DatabaseMisconfigured, DatabaseUnavailable

from .config import asyncpg_url

__all__ = [
    "make_engine",
    "TRANSIENT_SQLSTATES",
    "MISCONFIGURED_SQLSTATES",
    "SCHEMA_SQLSTATES",
    "is_transient",
    "database_error",
    "translate_errors",
    "transaction",
]

#: SQLSTATEs worth a retry: serialization failure, deadlock, lock timeout,
#: admin shutdown / terminated backend, crash shutdown, cannot connect now,
#: too many connections and the whole connection-exception class (08xxx).
TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"}
#: The transient ones that are a conflict between transactions, not the server being unreachable:
#: serialization failure, deadlock, lock timeout (still DatabaseUnavailable: retried).
LOCK_CONFLICT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})

#: SQLSTATEs that say the configured connection is wrong and will stay wrong:
#: no such database, no such role (or pg_hba refuses it), a wrong password.
MISCONFIGURED_SQLSTATES = {"3D000", "28000", "28P01"}

#: SQLSTATEs that say the schema is older than the code: undefined table,
#: column or schema (``billing db upgrade`` has not run).
SCHEMA_SQLSTATES = {"42P01", "42703", "3F000"}


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


def _driver_message(error: BaseException) -> str:
    """The driver's own message, first line only, without SQLAlchemy's SQL and background link."""
    orig = getattr(error, "orig", None)
    text = str(orig if orig is not None else error).strip() or type(error).__name__
    return text.splitlines()[0]


def database_error(error: BaseException) -> BillingError | None:
    """The :mod:`tasks.errors` form of a driver error, or None when it is not one.

    Parameters:
      error: Anything raised while connecting to or talking to PostgreSQL
        (SQLAlchemy's ``DBAPIError``, asyncpg's errors, ``OSError``...).

    Returns:
      :class:`DatabaseMisconfigured` for a connection that cannot work as
      configured (unknown database or role, wrong password, a schema older
      than the code); :class:`DatabaseUnavailable` for a transient failure
      (server down or unreachable, connection lost, deadlock...); None for
      anything else (a bug, a constraint violation), which callers re-raise.
    """
    if isinstance(error, BillingError):
        return error
    code = _sqlstate(error) if isinstance(error, sa_exc.DBAPIError) else getattr(error, "sqlstate", None)
    if code in MISCONFIGURED_SQLSTATES:
        return DatabaseMisconfigured(
            f"PostgreSQL refused the connection: {_driver_message(error)} (check BILLING_DATABASE_URL)"
        )
    if code in SCHEMA_SQLSTATES:
        return DatabaseMisconfigured(
            f"the database schema is older than this code ({_driver_message(error)}):"
            " run `billing db upgrade` first"
        )
    if isinstance(error, OverflowError):  # asyncpg's socket refuses a port outside 0..65535
        return DatabaseMisconfigured(f"BILLING_DATABASE_URL: {error}")
    if code in LOCK_CONFLICT_SQLSTATES:
        return DatabaseUnavailable(
            f"PostgreSQL rolled back a statement in a lock conflict (SQLSTATE {code}): {_driver_message(error)}"
        )
    if isinstance(error, (sa_exc.DBAPIError, ConnectionError, OSError, TimeoutError)) and is_transient(error):
        return DatabaseUnavailable(
            f"PostgreSQL is unreachable: {type(getattr(error, 'orig', None) or error).__name__}:"
            f" {_driver_message(error)}"
        )
    return None


@asynccontextmanager
async def translate_errors() -> AsyncIterator[None]:
    """Re-raise driver errors in the :mod:`tasks.errors` hierarchy (``raise ... from``).

    Transient ones become :class:`DatabaseUnavailable` (retried), a
    connection that cannot work as configured :class:`DatabaseMisconfigured`
    (see :func:`database_error`); anything else is re-raised as it is.
    """
    try:
        yield
    except (sa_exc.DBAPIError, ConnectionError, OSError, TimeoutError) as exc:
        translated = database_error(exc)
        if translated is not None:
            raise translated from exc
        raise


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One PostgreSQL transaction (READ COMMITTED); driver errors are translated."""
    async with translate_errors(), engine.begin() as conn:
        yield conn
