"""Connection settings read from the environment (SPEC "Deployment").

``BILLING_DATABASE_URL`` takes the plain ``postgresql://`` form every Postgres
tool takes; the SQLAlchemy ``postgresql+asyncpg://`` form is accepted too.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from tasks.errors import ConfigurationError

__all__ = ["DATABASE_URL_ENV", "database_url", "asyncpg_url", "plain_url"]

DATABASE_URL_ENV = "BILLING_DATABASE_URL"

_ACCEPTED_SCHEMES = {"postgresql", "postgres", "postgresql+asyncpg"}


def _check(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in _ACCEPTED_SCHEMES:
        raise ConfigurationError(f"{DATABASE_URL_ENV} must be a postgresql:// URL (got scheme {scheme!r})")
    return url


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
