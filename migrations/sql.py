"""Shared by the migrations: run a multi-statement SQL script one statement at a time."""

from __future__ import annotations

from alembic import op

__all__ = ["execute_all", "execute_script"]


def execute_script(script: str) -> None:
    """Run each statement of ``script`` (separated by ``;`` at a line end): asyncpg prepares one at a time."""
    for statement in (s.strip() for s in script.split(";\n")):
        if statement:
            op.execute(statement)


def execute_all(statements: list[str]) -> None:
    """Run each statement of a list (for statements that contain ``;``, e.g. PL/pgSQL bodies)."""
    for statement in statements:
        op.execute(statement)
