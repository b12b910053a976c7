"""Connection settings read from the environment (SPEC "Deployment").

``BILLING_DATABASE_URL`` takes the plain ``postgresql://`` form every Postgres
tool takes; the SQLAlchemy ``postgresql+asyncpg://`` form is accepted too.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from tasks.errors import ConfigurationError

__all__ = ["DATABASE_URL_ENV", "check_url", "database_url", "asyncpg_url", "plain_url"]

DATABASE_URL_ENV = "BILLING_DATABASE_URL"

_ACCEPTED_SCHEMES = {"postgresql", "postgres", "postgresql+asyncpg"}


def check_url(url: str, *, env: str = DATABASE_URL_ENV) -> str:
    """``url`` if it is a PostgreSQL URL that can work, else one clear line.

    Parameters:
      url: The configured URL.
      env: The variable it came from, named in the error.

    Raises:
      ConfigurationError: Another scheme, an ``@`` left unencoded in the
        user or password (drivers split such a URL in different places), or a
        port outside 1..65535.
    """
    parts = urlsplit(url)
    if parts.scheme not in _ACCEPTED_SCHEMES:
        raise ConfigurationError(f"{env} must be a postgresql:// URL (got scheme {parts.scheme!r})")
    if parts.netloc.count("@") > 1:
        raise ConfigurationError(
            f"{env} has more than one '@': percent-encode an '@' in the user or password as %40"
        )
    try:
        port = parts.port
    except ValueError:
        port = None if "," in parts.netloc else -1  # several hosts (libpq's multi-host form): theirs to check
    if port is not None and not 1 <= port <= 65_535:
        raise ConfigurationError(f"{env}: the port must be a number from 1 to 65535")
    return url


_check = check_url


def database_url() -> str | None:
    """The configured database URL, or None when ``BILLING_DATABASE_URL`` is unset or empty.

    Raises:
      ConfigurationError: The variable is set to something that is not a PostgreSQL URL.
    """
    url = os.environ.get(DATABASE_URL_ENV, "").strip()
    return _check(url) if url else None


def asyncpg_url(url: str) -> str:
    """``url`` in SQLAlchemy's ``postgresql+asyncpg://`` form."""
    _check(url)
    scheme, rest = url.split("://", 1)
    return f"postgresql+asyncpg://{rest}"


def plain_url(url: str) -> str:
    """``url`` in the plain ``postgresql://`` form (for psql, asyncpg.connect and friends)."""
    _check(url)
    scheme, rest = url.split("://", 1)
    return f"postgresql://{rest}"
