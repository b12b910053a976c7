"""The migrations reach the declared schema, and go down and up again.

Each test makes its own database (``billing_mig_*``) on the test server and
drops it.  ``db/schema.sql`` is the declared schema of head; when a new
migration changes it, regenerate it with
``python -m db.migrate --dump-schema --write`` and review the diff.
"""

from __future__ import annotations

import asyncio
import difflib
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from db.config import plain_url
from db.migrate import SCHEMA_PATH, downgrade, dump_schema, pg_dump_path, upgrade
from harness.services import fresh_database, postgres_server

FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "db" / "sql" / "functions"


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A new database with no migration run yet; dropped afterwards."""
    if pg_dump_path() is None:
        pytest.skip("pg_dump is not installed")
    with postgres_server(try_local=True) as server:
        with fresh_database(server.url, f"billing_mig_{uuid.uuid4().hex[:10]}", migrate=False) as url:
            yield url


def _dump(url: str) -> str:
    try:
        return dump_schema(url)
    except subprocess.CalledProcessError as exc:
        if "version mismatch" in (exc.stderr or ""):
            pytest.skip(f"pg_dump is older than the server: {exc.stderr.strip()}")
        raise


def _assert_declared(schema: str) -> None:
    declared = SCHEMA_PATH.read_text()
    if schema != declared:
        diff = "".join(
            difflib.unified_diff(
                declared.splitlines(keepends=True),
                schema.splitlines(keepends=True),
                "db/schema.sql",
                "migrated head",
            )
        )
        pytest.fail(
            "the migrated head differs from db/schema.sql (a new migration? run"
            f" `python -m db.migrate --dump-schema --write` and review):\n{diff[:6000]}"
        )


def _fetch(url: str, sql: str) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(plain_url(url))
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    return asyncio.run(go())


def test_the_migrated_head_is_the_declared_schema(empty_database: str) -> None:
    upgrade(empty_database)
    _assert_declared(_dump(empty_database))


def test_upgrade_downgrade_to_base_upgrade_again(empty_database: str) -> None:
    upgrade(empty_database)
    downgrade(empty_database, "base")
    left = _fetch(
        empty_database,
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'S') AND c.relname <> 'alembic_version'",
    )
    functions = _fetch(
        empty_database,
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'",
    )
    assert (left, functions) == ([], []), "downgrade to base left tables or functions behind"
    upgrade(empty_database)
    _assert_declared(_dump(empty_database))


def _body(source: str) -> str:
    """The function body between the ``$$`` quotes, whitespace collapsed."""
    match = re.search(r"\$\$(.*)\$\$", source, re.S)
    assert match is not None, "a function source without a $$ body"
    return " ".join(match.group(1).split())


def test_every_function_of_head_is_its_source_file(empty_database: str) -> None:
    upgrade(empty_database)
    rows = _fetch(
        empty_database,
        "SELECT p.proname, p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'public' ORDER BY p.proname",
    )
    migrated = {r["proname"]: " ".join(r["prosrc"].split()) for r in rows}
    files = {p.stem: _body(p.read_text()) for p in FUNCTIONS_DIR.glob("*.sql")}
    assert sorted(migrated) == sorted(files), "db/sql/functions/ must hold exactly the functions of head"
    for name, body in files.items():
        assert migrated[name] == body, f"{name}: the migrated function is not db/sql/functions/{name}.sql"
