"""PostgreSQL: configuration, the async engine, models, migrations and the money SQL."""

from .config import asyncpg_url, database_url, plain_url
from .engine import make_engine, transaction, translate_errors

__all__ = [
    # configuration
    "database_url",
    "asyncpg_url",
    "plain_url",
    # engine
    "make_engine",
    "transaction",
    "translate_errors",
]
