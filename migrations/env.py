"""Alembic environment: runs migrations over asyncpg with ``BILLING_DATABASE_URL``."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from db.config import asyncpg_url

config = context.config
target_metadata = None


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from db.config import database_url

        url = database_url()
    if not url:
        raise RuntimeError("BILLING_DATABASE_URL is not set")
    return asyncpg_url(url)


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    async with engine.connect() as conn:
        await conn.run_sync(_run)
        await conn.commit()
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
