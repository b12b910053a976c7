"""What went wrong with a dependency, in one line: the one translation the CLI and the dashboard share.

:func:`dependency_error` turns whatever PostgreSQL's driver, Redis' client or
Dramatiq raised into the :mod:`tasks.errors` hierarchy, whose
:attr:`~tasks.errors.BillingError.exit_code` the ``billing`` CLI exits with
(1: a dependency is down or misconfigured).  PostgreSQL's part lives at the
``db/`` boundary (:func:`db.engine.database_error`); Redis' part is here.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from tasks.errors import BillingError, BrokerMisconfigured, BrokerUnavailable

__all__ = ["dependency_error", "rabbitmq_error", "redis_error", "one_line"]


def one_line(text: str) -> str:
    """``text`` with its lines joined by spaces (an error is printed as one line)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _raised_inside(error: BaseException, package: str) -> bool:
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    return bool(frames) and package in Path(frames[-1].filename).parts


def redis_error(error: BaseException) -> BillingError | None:
    """The :mod:`tasks.errors` form of an error from Redis' client or Dramatiq's broker, or None.

    Returns:
      :class:`~tasks.errors.BrokerMisconfigured` for a connection that cannot
      work as configured (a URL Redis' client cannot parse, a database number
      the server does not have, a refused password);
      :class:`~tasks.errors.BrokerUnavailable` for a server that is down or
      unreachable; None for anything else.
    """
    import dramatiq.errors
    import redis.exceptions

    if isinstance(error, redis.exceptions.AuthenticationError):
        return BrokerMisconfigured(
            f"Redis refused the connection: {one_line(str(error))} (check BILLING_REDIS_URL)"
        )
    if isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return BrokerUnavailable(f"Redis is unreachable: {one_line(str(error))}")
    if isinstance(error, redis.exceptions.ResponseError):
        return BrokerMisconfigured(
            f"Redis refused the connection: {one_line(str(error))} (check BILLING_REDIS_URL)"
        )
    if isinstance(error, redis.exceptions.RedisError):
        return BrokerUnavailable(f"Redis failed: {type(error).__name__}: {one_line(str(error))}")
    if isinstance(error, dramatiq.errors.BrokerConnectionError):
        return BrokerUnavailable(f"Redis is unreachable: {one_line(str(error))}")
    if isinstance(error, (ValueError, TypeError)) and _raised_inside(error, "redis"):
        # redis.from_url: an unknown scheme, a database that is not a number...
        return BrokerMisconfigured(f"BILLING_REDIS_URL: {one_line(str(error))}")
    return None


def rabbitmq_error(error: BaseException) -> BillingError | None:
    """The :mod:`tasks.errors` form of an error from pika or Dramatiq's RabbitMQ broker, or None.

    Returns:
      :class:`~tasks.errors.BrokerMisconfigured` for refused credentials or
      a vhost the user may not open; :class:`~tasks.errors.BrokerUnavailable`
      for a server that is down, unreachable or closed the connection; None
      for anything else.
    """
    import dramatiq.errors
    import pika.exceptions

    cause = error.message if isinstance(error, dramatiq.errors.BrokerConnectionError) else error
    if isinstance(
        cause, (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError)
    ):
        return BrokerMisconfigured(
            f"RabbitMQ refused the connection: {one_line(str(cause))} (check BILLING_BROKER_URL)"
        )
    if isinstance(cause, pika.exceptions.AMQPError):
        return BrokerUnavailable(f"RabbitMQ is unreachable: {type(cause).__name__}: {one_line(str(cause))}")
    return None


def dependency_error(error: BaseException) -> BillingError | None:
    """``error`` itself when it is a :class:`~tasks.errors.BillingError`; else its translation, or None.

    Parameters:
      error: Anything a command or a page raised.

    Returns:
      A BillingError whose message is one line and whose ``exit_code`` is
      the CLI's (2: bad input, 1: a dependency down or misconfigured), or
      None when ``error`` is not a dependency's (a bug: callers re-raise it
      or report it as unexpected).
    """
    if isinstance(error, BillingError):
        return error
    from db.engine import database_error  # SQLAlchemy only when something failed

    return database_error(error) or rabbitmq_error(error) or redis_error(error)
