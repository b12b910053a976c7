"""Every SQL statement that moves money, as named blocks in the ``.sql`` files of this folder.

A block starts with a ``-- name: <name>`` line and runs to the next one
(procrastinate's ``queries.sql`` style); the comment lines right under the
header say why the statement is written the way it is.  The files are read
once, at import: :data:`queries` maps each name to its statement's text
(comments and the final ``;`` stripped), and :func:`statement` wraps one in
a SQLAlchemy ``text()`` clause with its JSON parameters and columns typed.

``functions/`` holds the current source of each PL/pgSQL function, one file
per version (``billing_renew_charge_v1.sql``); a migration creates a
version from its file (:func:`function_source`), and a changed rule is a
new version file plus a migration, so old migrations keep their text.

A small loader of our own rather than aiosql: the money path needs
SQLAlchemy ``text()`` clauses (typed JSONB binds, one connection per
transaction), not functions bound to a driver.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

__all__ = ["function_source", "load", "one", "queries", "statement"]

_HEADER = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)[ \t]*$", re.M)


def load(source: str) -> dict[str, str]:
    """The named statements of one ``.sql`` text: name -> SQL without comment lines or the final ``;``.

    Raises:
      ValueError: A name appears twice, or a block is empty.
    """
    found: dict[str, str] = {}
    parts = _HEADER.split(source)
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sql = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("--"))
        sql = sql.strip().removesuffix(";").rstrip()
        if name in found or not sql:
            raise ValueError(f"SQL block {name!r} is repeated or empty")
        found[name] = sql
    return found


def _load_all() -> dict[str, str]:
    found: dict[str, str] = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            blocks = load(entry.read_text(encoding="utf-8"))
            if repeated := set(blocks) & set(found):
                raise ValueError(f"{entry.name}: SQL blocks {sorted(repeated)} are named in another file too")
            found.update(blocks)
    return found


#: Every named statement of ``db/sql/*.sql``: name -> SQL text.
queries: dict[str, str] = _load_all()


def statement(name: str, *, json_params: tuple[str, ...] = (), json_columns: tuple[str, ...] = ()) -> Any:
    """The statement ``name`` as a ``text()`` clause; ``json_params``/``json_columns`` are typed JSONB.

    Raises:
      KeyError: No block has that name.
    """
    clause: Any = text(queries[name])
    if json_params:
        clause = clause.bindparams(*(bindparam(p, type_=JSONB) for p in json_params))
    if json_columns:
        clause = clause.columns(**{c: JSONB for c in json_columns})
    return clause


def function_source(name: str) -> str:
    """The ``CREATE FUNCTION`` text of ``functions/<name>.sql`` (a versioned name, e.g. ``billing_iso_v1``)."""
    return resources.files(__name__).joinpath("functions", f"{name}.sql").read_text(encoding="utf-8")


async def one(conn: Any, clause: Any, **params: Any) -> Any:
    """Run ``clause`` on ``conn`` (an ``AsyncConnection``) and return its one row as a mapping, or None."""
    return (await conn.execute(clause, params)).mappings().one_or_none()
