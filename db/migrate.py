"""Alembic programmatically (``billing db upgrade``), and the declared schema the migrations must reach.

``db/schema.sql`` is the schema a database migrated to head has: the
output of ``pg_dump --schema-only --no-owner --no-privileges``, normalised
(:func:`normalise_schema`).  ``tests/migrations/`` migrates a fresh
database and compares.  After adding a migration, regenerate it with::

    BILLING_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m db.migrate --dump-schema --write

(a throw-away database ``billing_mig_dump_*`` is created on that server,
migrated, dumped and dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from alembic import command
from alembic.config import Config

from .config import database_url, plain_url

__all__ = [
    "SCHEMA_PATH",
    "alembic_config",
    "downgrade",
    "dump_schema",
    "fresh_schema",
    "normalise_schema",
    "pg_dump_path",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
#: The declared schema of head (generated: ``python -m db.migrate --dump-schema --write``).
SCHEMA_PATH = Path(__file__).resolve().parent / "schema.sql"


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` using the packaged ``migrations/`` folder."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` (``postgresql://``) to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database at ``url`` down to ``revision`` (``base``: no tables left)."""
    command.downgrade(alembic_config(url), revision)


#: Lines of a dump that say nothing about the schema: comments, session
#: settings, and pg_dump's per-run ``\restrict`` keys.
_NOISE = re.compile(r"^(--|SET |SELECT pg_catalog\.set_config\(|\\restrict |\\unrestrict )")


def normalise_schema(dump: str) -> str:
    """A ``pg_dump --schema-only`` text without comments, ``SET`` lines and runs of blank lines."""
    lines = [line.rstrip() for line in dump.splitlines() if not _NOISE.match(line)]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def pg_dump_path() -> str | None:
    """The newest ``pg_dump`` of this machine (Debian's versioned ones first), or None."""
    versioned = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_dump"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if versioned:
        return str(versioned[-1])
    return shutil.which("pg_dump")


def dump_schema(url: str) -> str:
    """The normalised schema of the database at ``url`` (``postgresql://``).

    Raises:
      FileNotFoundError: No ``pg_dump`` on this machine.
      subprocess.CalledProcessError: pg_dump failed (e.g. older than the server).
    """
    pg_dump = pg_dump_path()
    if pg_dump is None:
        raise FileNotFoundError("pg_dump is not installed")
    out = subprocess.run(
        [pg_dump, "--schema-only", "--no-owner", "--no-privileges", "--dbname", plain_url(url)],
        check=True,
        capture_output=True,
        text=True,
    )
    return normalise_schema(out.stdout)


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _execute(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(plain_url(url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def fresh_schema(server_url: str) -> str:
    """Create a throw-away database on the server at ``server_url``, migrate it to head, dump it, drop it."""
    name = f"billing_mig_dump_{uuid.uuid4().hex[:10]}"
    asyncio.run(_execute(server_url, f'CREATE DATABASE "{name}"'))
    try:
        url = _with_database(server_url, name)
        upgrade(url)
        return dump_schema(url)
    finally:
        asyncio.run(_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def main(argv: list[str] | None = None) -> int:
    """``python -m db.migrate --dump-schema [--write]``: print (or write ``db/schema.sql``) the schema of head."""
    parser = argparse.ArgumentParser(prog="python -m db.migrate", description=main.__doc__)
    parser.add_argument("--dump-schema", action="store_true", required=True, help="dump the schema of head")
    parser.add_argument("--write", action="store_true", help=f"write it to {SCHEMA_PATH}")
    args = parser.parse_args(argv)
    server = database_url()
    if not server:
        print("BILLING_DATABASE_URL must name a server to create a throw-away database on", file=sys.stderr)
        return 2
    schema = fresh_schema(server)
    if args.write:
        SCHEMA_PATH.write_text(schema)
        print(f"wrote {SCHEMA_PATH}")
    else:
        sys.stdout.write(schema)
    return 0


if __name__ == "__main__":
    sys.exit(main())
