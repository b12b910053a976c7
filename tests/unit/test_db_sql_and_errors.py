"""db.sql's named blocks and db.errors' conversion by constraint name."""

from __future__ import annotations

import pickle

import pytest
import sqlalchemy.exc

from db.errors import InvalidValue, NotFound, SettingRefused, constraint_name
from db.sql import load, queries, statement
from tasks.errors import PermanentError


def test_blocks_are_read_by_name_without_their_comments() -> None:
    blocks = load(
        "-- a file's heading\n\n-- name: first\n-- why it is written so\nSELECT 1;\n\n"
        "-- name: second\nSELECT :a\n  -- inside\nFROM t;\n"
    )
    assert blocks == {"first": "SELECT 1", "second": "SELECT :a\nFROM t"}


def test_a_repeated_or_empty_block_is_refused() -> None:
    with pytest.raises(ValueError, match="'a'"):
        load("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")
    with pytest.raises(ValueError, match="'b'"):
        load("-- name: b\n-- nothing\n")


def test_every_statement_of_the_money_path_is_loaded() -> None:
    assert {"claim_keys", "lock_account", "post_ledger_entry", "renew_charge", "insert_outbox"} <= set(
        queries
    )
    assert all(sql and not sql.endswith(";") for sql in queries.values())
    with pytest.raises(KeyError):
        statement("no_such_statement")


class _AsyncpgError(Exception):
    constraint_name = "accounts_top_up_cap_covers_amount"


def _driver_error() -> sqlalchemy.exc.IntegrityError:
    orig = Exception("new row violates check constraint")
    orig.__cause__ = _AsyncpgError()
    return sqlalchemy.exc.IntegrityError("UPDATE accounts ...", {}, orig)


def test_a_refused_setting_is_named_by_its_constraint_not_its_text() -> None:
    error = _driver_error()
    assert constraint_name(error) == "accounts_top_up_cap_covers_amount"
    refused = SettingRefused(constraint_name(error) or "", cause=error)
    assert isinstance(refused, PermanentError) and isinstance(refused, sqlalchemy.exc.IntegrityError)
    assert refused.constraint == "accounts_top_up_cap_covers_amount"
    assert refused.message == "the monthly cap must be at least the top-up amount"
    assert "accounts_top_up_cap_covers_amount" in str(refused)
    assert refused.exit_code == 2
    assert pickle.loads(pickle.dumps(refused)).constraint == refused.constraint


def test_typed_errors_are_still_the_builtins_they_replace() -> None:
    assert issubclass(InvalidValue, ValueError) and issubclass(InvalidValue, PermanentError)
    assert issubclass(NotFound, LookupError) and issubclass(NotFound, PermanentError)
