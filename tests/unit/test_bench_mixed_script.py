"""bench/mixed_limit/*.sql are the money path's SQL for the four mixed kinds, generated from db/sql and kept current."""

from __future__ import annotations

import re

import pytest

from bench import mixed_script
from bench.mixed_script import COMMITTED_KINDS, KINDS, SCRIPT_DIR, SCRIPTS, generate, generate_all
from bench.renewal_script import generate as generate_renewal
from db.sql import queries

_VARIABLE = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def test_committed_scripts_are_current() -> None:
    for name, text in generate_all(COMMITTED_KINDS).items():
        assert (SCRIPT_DIR / name).read_text() == text, (
            f"bench/mixed_limit/{name} is stale: run `python -m bench.mixed_script --write` (db/sql changed)"
        )
    assert sorted(p.name for p in SCRIPT_DIR.glob("*.sql")) == sorted(f"{k}.sql" for k in COMMITTED_KINDS)
    # the renewal's script is the one committed as bench/renewal.sql (its own staleness test checks it)
    assert set(KINDS) - set(COMMITTED_KINDS) == {"renew"}


def test_each_statement_is_the_money_paths_block_in_order() -> None:
    assert generate("renew") == generate_renewal()
    for kind, steps in SCRIPTS.items():
        script = generate(kind)
        at = 0
        for step in steps:
            name = step[0]
            if name in ("BEGIN", "COMMIT"):
                at = script.index(f"{name};", at) + len(name)
                continue
            at = script.index(f"-- db/sql: {name}\n", at)
            if name in queries:
                # the block's text between its parameters is all there, in order
                rendered, pos = " ".join(script[at:].split()), 0
                for fragment in _VARIABLE.split(queries[name])[::2]:
                    fragment = " ".join(fragment.split())
                    pos = rendered.index(fragment, pos) + len(fragment)
        assert script.rstrip().endswith("COMMIT;")
        # the key is claimed in autocommit, before the first transaction
        assert script.index("-- db/sql: claim_keys") < script.index("BEGIN;")


def test_only_known_pgbench_variables_remain_and_none_is_in_a_literal() -> None:
    known = {"run", "client_id", "clients", "subscriptions", "seq", "subs", "n", "sn", "mixplan"}
    gset = {"plan_id", "plan_price_micros", "plan_interval_count", "owner_account_id"}
    for kind in ("subscribe", "auto_top_up", "revoke_key"):
        script = "\n".join(line for line in generate(kind).splitlines() if not line.startswith("--"))
        assert set(_VARIABLE.findall(script)) <= known | gset, kind
        # pgbench reads ':name' inside a quoted literal as a variable too
        literals = re.findall(r"'[^']*'", script)
        assert not [lit for lit in literals if _VARIABLE.search(lit)], kind


def test_a_missing_block_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SCRIPTS, "revoke_key", [("no_such_block", {})])
    with pytest.raises(LookupError, match="no_such_block"):
        mixed_script.generate("revoke_key")
