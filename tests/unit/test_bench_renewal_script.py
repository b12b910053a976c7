"""bench/renewal.sql is the money path's renewal SQL, generated from db/money.py and kept current."""

from __future__ import annotations

import re

import pytest

from bench.renewal_script import SCRIPT_PATH, STEPS, generate, render, statement_text, substitute


def test_committed_script_is_current() -> None:
    assert SCRIPT_PATH.read_text() == generate(), (
        "bench/renewal.sql is stale: run `python -m bench.renewal_script --write` (db/money.py changed)"
    )


def test_every_statement_of_the_renewal_comes_from_db_money() -> None:
    script = generate()
    for name, _ in STEPS:
        if name.startswith("_"):
            assert f"-- db.money.{name}\n{render(name)};" in script
            # the constant's text between its parameters is all there, in order
            rendered, at = " ".join(render(name).split()), 0
            for fragment in re.split(r"(?<![:\w]):\w+", statement_text(name)):
                fragment = " ".join(fragment.split()).rstrip(";")
                at = rendered.index(fragment, at) + len(fragment)
    # autocommitted claim first, then one transaction
    assert script.index("db.money._CLAIM_KEYS") < script.index("BEGIN;") < script.index("db.money._LOCK_KEY")
    assert script.rstrip().endswith("COMMIT;")
    assert "_SUBSCRIPTION_ACCOUNT" in script  # named where the \gset read replaces it


def test_only_known_pgbench_variables_remain() -> None:
    script = "\n".join(line for line in generate().splitlines() if not line.startswith("--"))
    variables = set(re.findall(r"(?<![:\w]):([A-Za-z_]\w*)", script))
    gset = {
        "sub",
        "account",
        "plan",
        "period_start",
        "period_end",
        "period_index",
        "amount",
        "ledger_key",
        "result",
    }
    assert variables <= gset | {"run", "client_id", "clients", "subscriptions", "seq", "n"}


def test_an_unmapped_parameter_is_named() -> None:
    with pytest.raises(KeyError, match=":new_param"):
        substitute("UPDATE t SET a = :a, b = :new_param::int", {"a": "1"}, where="db.money._X")
    assert substitute("SELECT :a::text, CAST(:a AS int)", {"a": ":v"}) == "SELECT :v::text, CAST(:v AS int)"


def test_a_renamed_constant_is_named() -> None:
    with pytest.raises(LookupError, match="_NO_SUCH_STATEMENT"):
        statement_text("_NO_SUCH_STATEMENT")
