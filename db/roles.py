"""Least privilege in PostgreSQL: the grants of the worker role.

Migrations run as the schema's **owner** role.  Workers, the scheduler, the
dashboard and the CLI's day-to-day commands run as a **worker** role that

* can read and write what the money path writes, and INSERT ledger rows,
* can neither UPDATE nor DELETE a ledger row (the ledger is append-only; the
  ``ledger_entries_append_only`` trigger of migration 0004 also refuses it
  to the owner),
* cannot change the schema (no CREATE on the schema, owns no table).

:func:`grant_worker_role` is run by the owner (``billing db grant ROLE``)
after each migration; it is idempotent.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from .errors import InvalidValue

__all__ = ["WORKER_GRANTS", "grant_worker_role"]

#: Table -> privileges of the worker role.  Tables not listed get none.
WORKER_GRANTS: dict[str, str] = {
    "accounts": "SELECT, INSERT, UPDATE",
    "plans": "SELECT, INSERT",
    "subscriptions": "SELECT, INSERT, UPDATE",
    "api_keys": "SELECT, INSERT, UPDATE",
    "top_up_attempts": "SELECT, INSERT, UPDATE",
    # append-only: no UPDATE, no DELETE
    "ledger_entries": "SELECT, INSERT",
    # DELETE: a renewal asked before it can be decided forgets its key
    "idempotency_keys": "SELECT, INSERT, UPDATE, DELETE",
    "funds_waits": "SELECT, INSERT, DELETE",
    "outbox": "SELECT, INSERT, DELETE",
    "entitlements": "SELECT, INSERT, UPDATE",
    "failed_messages": "SELECT, INSERT, UPDATE",
    "operator_actions": "SELECT, INSERT",
    "fake_provider_charges": "SELECT, INSERT, UPDATE",
    # sealed API key deliveries (migration 0007): written with the key, acknowledged by
    # the consumer (UPDATE drops the ciphertext); never deleted
    "api_key_deliveries": "SELECT, INSERT, UPDATE",
    "api_key_recipients": "SELECT, INSERT, UPDATE, DELETE",
    # the scheduler's record of what it enqueued (upserted, one row per subscription)
    "scheduled_renewals": "SELECT, INSERT, UPDATE",
    # usage events are written once, never changed (migration 0011)
    "usage_events": "SELECT, INSERT",
    # the has_credits flag, written by the accounts trigger in the worker's own transaction
    "account_entitlements": "SELECT, INSERT, UPDATE",
    "alembic_version": "SELECT",
}


def _ident(name: str) -> str:
    if not name or not all(c.isalnum() or c == "_" for c in name):
        raise InvalidValue(f"role name {name!r}: letters, digits and _ only")
    return '"' + name + '"'


async def grant_worker_role(conn: AsyncConnection, role: str, *, password: str | None = None) -> None:
    """Create ``role`` if missing (LOGIN) and give it exactly :data:`WORKER_GRANTS`.

    Run as the owner of the tables, in a transaction.  Privileges the role
    had beyond the list are revoked first, so a re-run converges.

    Parameters:
      role: Role name (letters, digits, ``_``).
      password: Sets the role's password when given (stored by PostgreSQL as a SCRAM hash).

    Raises:
      db.errors.InvalidValue: A role name with other characters (a ``ValueError``).
      sqlalchemy.exc.ProgrammingError: The caller may not create roles or does not own the tables.
    """
    quoted = _ident(role)
    exists = (
        await conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role})
    ).one_or_none()
    if exists is None:
        await conn.execute(text(f"CREATE ROLE {quoted} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"))
    if password is not None:
        # a bind parameter is not allowed in CREATE/ALTER ROLE: quote the literal with PostgreSQL's own function
        literal = (await conn.execute(text("SELECT quote_literal(:p)"), {"p": password})).scalar_one()
        await conn.execute(text(f"ALTER ROLE {quoted} PASSWORD {literal}"))
    database = (await conn.execute(text("SELECT current_database()"))).scalar_one()
    await conn.execute(text(f'GRANT CONNECT ON DATABASE "{database}" TO {quoted}'))
    await conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {quoted}"))
    await conn.execute(text(f"REVOKE CREATE ON SCHEMA public FROM {quoted}"))
    await conn.execute(text(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {quoted}"))
    for table, privileges in WORKER_GRANTS.items():
        await conn.execute(text(f"GRANT {privileges} ON {table} TO {quoted}"))
