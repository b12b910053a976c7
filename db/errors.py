"""The errors :mod:`db` raises, converted at its boundary.

Nothing outside :mod:`db` reads a driver error's text.  A constraint that
refuses an operator's setting is converted here by its *name* (asyncpg's
``constraint_name``, psycopg's ``diag.constraint_name``) into
:class:`SettingRefused`, the way procrastinate's manager turns a
``UniqueViolation`` into ``AlreadyEnqueued``.  Every value :mod:`db`
refuses is a :class:`tasks.errors.PermanentError` (the CLI exits 2); the
ones that replace a builtin (``ValueError``, ``LookupError``) also subclass
it, so an ``except ValueError`` written before keeps working.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import exc as sa_exc

from tasks.errors import PermanentError

__all__ = [
    "SETTING_CONSTRAINTS",
    "InvalidValue",
    "KeyNotReissuable",
    "NoStoredRequest",
    "NotFound",
    "SettingRefused",
    "constraint_name",
    "refusing_settings",
]

#: The operator-facing reason of each constraint that can refuse a setting
#: (account, plan and auto-top-up set-up), by constraint name.
SETTING_CONSTRAINTS: dict[str, str] = {
    "accounts_top_up_configured": (
        "auto-top-up needs a threshold, an amount and a payment method before it can be enabled"
    ),
    "accounts_top_up_cap_covers_amount": "the monthly cap must be at least the top-up amount",
    "accounts_top_up_amount_range": "the top-up amount must be between 1 and 10**15 micros",
    "accounts_top_up_threshold_range": "the top-up threshold must be between 0 and 10**15 micros",
    "accounts_top_up_monthly_cap_range": "the monthly cap must be between 1 and 10**15 micros",
    "accounts_balance_non_negative": "the balance cannot be negative",
}


class SettingRefused(PermanentError, sa_exc.IntegrityError):  # type: ignore[misc,override]  # .code is BillingError's
    """PostgreSQL refused an operator's setting: a constraint does not hold for it.

    Attributes:
      constraint: The refusing constraint's name (e.g.
        ``accounts_top_up_cap_covers_amount``).
      message: The reason in operator's words (:data:`SETTING_CONSTRAINTS`).

    It is also a ``sqlalchemy.exc.IntegrityError`` carrying the driver's
    statement and error, so code that caught the driver error still does;
    ``str()`` names the constraint.
    """

    def __init__(
        self, constraint: str, message: str | None = None, *, cause: sa_exc.DBAPIError | None = None
    ):
        self.constraint = constraint
        self.message = message or SETTING_CONSTRAINTS.get(constraint) or f"the setting breaks {constraint}"
        orig: BaseException = (cause.orig if cause is not None else None) or Exception(self.message)
        sa_exc.IntegrityError.__init__(
            self,
            cause.statement if cause is not None else None,
            cause.params if cause is not None else None,
            orig,
        )

    def __str__(self) -> str:
        return f"{self.message} (constraint {self.constraint})"

    def __reduce__(self):  # type: ignore[no-untyped-def]  # pickled with its own arguments
        return (type(self), (self.constraint, self.message))


class InvalidValue(PermanentError, ValueError):
    """A value outside what the database accepts (an amount, a name, a state)."""


class NoStoredRequest(PermanentError, ValueError):
    """An idempotency key has no stored request to send again."""


class NotFound(PermanentError, LookupError):
    """No row has the given id."""


class KeyNotReissuable(PermanentError):
    """Only an active managed key of a live subscription is reissued."""


def constraint_name(error: BaseException) -> str | None:
    """The name of the constraint a driver error reports, or None.

    Reads asyncpg's ``constraint_name`` or psycopg's ``diag.constraint_name``
    on the error, its ``orig`` (SQLAlchemy's wrapper) or that one's cause
    (SQLAlchemy's asyncpg adapter), never the error's text.
    """
    orig = getattr(error, "orig", None)
    for candidate in (error, orig, getattr(orig, "__cause__", None)):
        if candidate is None:
            continue
        name = getattr(candidate, "constraint_name", None) or getattr(
            getattr(candidate, "diag", None), "constraint_name", None
        )
        if name:
            return str(name)
    return None


@asynccontextmanager
async def refusing_settings() -> AsyncIterator[None]:
    """Convert a constraint violation inside the block into :class:`SettingRefused` (``raise ... from``).

    An integrity error without a constraint name is re-raised as it is.
    """
    try:
        yield
    except SettingRefused:
        raise
    except sa_exc.IntegrityError as exc:
        name = constraint_name(exc)
        if name is None:
            raise
        raise SettingRefused(name, cause=exc) from exc
