"""The pgbench script of one renewal, generated from the money path's own SQL (``db/sql/``, through ``db.money``).

``make bench`` measures "the limit" by running, with pgbench, the statements
``BillingService`` runs for one ``renew`` message, at the workers'
concurrency.  The statements are not copied: they are read from the
constants of :mod:`db.money` (their ``.text``), and each ``:name`` parameter
is replaced by a pgbench variable or an SQL expression (:data:`STEPS`), so
the script follows ``db/`` by construction.  ``bench/renewal.sql`` is the
committed output; ``tests/unit/test_bench_renewal_script.py`` fails when it
is stale (``python -m bench.renewal_script --write`` regenerates it).

If a constant is renamed or gains a parameter, generation fails with a
message naming it: map it in :data:`STEPS`.

Each pgbench transaction renews a fresh period: a random subscription of the
client's own share (client ``c`` of ``C`` takes subscriptions ``c``,
``c + C``, ``c + 2C``..., so two clients never renew one subscription at
once), read with ``\\gset`` in place of ``_SUBSCRIPTION_ACCOUNT`` (the same
one indexed read, returning also the period to charge), under a key unique
to the run, client and transaction.  The read computes the next period as
``current_period_end + interval_count days``, which is
:func:`db.periods.period_bounds` for the daily plan the bench uses (a
monthly plan would need its calendar arithmetic).

pgbench runs it with ``-M prepared`` (as asyncpg does: parse and plan once
per connection) and these variables: ``run`` (a prefix unique to the
measurement), ``clients`` (pgbench's ``-c``), ``subscriptions`` (how many
bench subscriptions exist, numbered from 0) and ``seq`` (0; a per-client
counter, kept by pgbench across a client's transactions).
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from db import money

__all__ = [
    "STEPS",
    "SUBSCRIPTION_PREFIX",
    "SCRIPT_PATH",
    "generate",
    "render",
    "statement_text",
    "substitute",
]

#: Ids of the bench's subscriptions: ``bsub-0`` .. ``bsub-{n-1}`` (see :mod:`bench.data`).
SUBSCRIPTION_PREFIX = "bsub-"
SCRIPT_PATH = Path(__file__).resolve().parent / "renewal.sql"

#: The message's idempotency key: unique per run, client and transaction.
_KEY = "('pgbench:' || CAST(:run AS text) || ':' || CAST(:client_id AS text) || ':' || CAST(:seq AS text))"

#: In place of ``_SUBSCRIPTION_ACCOUNT``: the subscription's owner, and the period its renewal charges.
#: (No ``:name`` in literals: pgbench would take it for a variable.)
_READ_SUBSCRIPTION = f"""
SELECT s.id AS sub, s.account_id AS account, s.plan_id AS plan,
       s.current_period_end AS period_start,
       s.current_period_end + make_interval(days => p.interval_count) AS period_end,
       s.period_index + 1 AS period_index,
       -p.price_micros AS amount,
       'renewal:' || s.id || ':' || (to_jsonb(s.current_period_end) #>> '{{}}') AS ledger_key,
       jsonb_build_object('outcome', 'renewed', 'subscription_id', s.id, 'account_id', s.account_id,
                          'period_start', s.current_period_end, 'charged_micros', p.price_micros,
                          'current_period_end', s.current_period_end + make_interval(days => p.interval_count)
       ) AS result
FROM subscriptions s JOIN plans p ON p.id = s.plan_id
WHERE s.id = '{SUBSCRIPTION_PREFIX}' || CAST(:n AS text)
"""

#: The renewal as ``BillingService._apply`` + ``money.apply_renew`` run it, in order:
#: (name of the ``db.money`` constant, or a raw statement; parameter -> pgbench variable or SQL).
#: ``None`` marks the transaction's ``BEGIN`` / ``COMMIT``.
STEPS: list[tuple[str, dict[str, str]]] = [
    # autocommit, before the effect: counts the delivery (BillingService.handle)
    (
        "_CLAIM_KEYS",
        {
            "keys": f"ARRAY[{_KEY}]",
            "kinds": "ARRAY['renew']",
            "fingerprints": "ARRAY['pgbench-renewal']",
            "account_ids": "ARRAY[NULL]",  # a renew message names no account
            "message_ids": f"ARRAY[{_KEY}]",
            "requests": 'ARRAY[\'{"actor_name": "renew"}\']',
            "lease_expires_at": "now() + interval '15 minutes'",
        },
    ),
    ("BEGIN", {}),
    ("_LOCK_KEY", {"key": _KEY}),
    ("READ_SUBSCRIPTION", {}),  # in place of _SUBSCRIPTION_ACCOUNT
    ("_LOCK_ACCOUNT", {"account_id": ":account"}),
    ("_LOCK_SUBSCRIPTION", {"subscription_id": ":sub"}),
    (
        "_RENEW_CHARGE",
        {
            "account_id": ":account",
            "subscription_id": ":sub",
            "plan_id": ":plan",
            "price_micros": "-CAST(:amount AS bigint)",
            "index": ":period_index",
            "period_start": ":period_start",
            "period_end": ":period_end",
            "now": "now()",
        },
    ),
    (
        "_COMPLETE_KEY",
        {
            "key": _KEY,
            "status": "'completed'",
            "result": ":result",
            "account_id": ":account",
            "now": "now()",
        },
    ),
    ("COMMIT", {}),
]

#: A ``:name`` bind parameter (not the second colon of a ``::type`` cast).
_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def statement_text(name: str) -> str:
    """The SQL text of the ``db.money`` constant ``name`` (a TextClause, or a TextualSelect around one).

    Raises:
      LookupError: ``db.money`` has no such constant any more (map the new name in :data:`STEPS`).
    """
    clause: Any = getattr(money, name, None)
    if clause is None:
        raise LookupError(
            f"db.money.{name} is gone: map the money path's new statement in bench/renewal_script.py"
        )
    sql = getattr(clause, "text", None) or getattr(getattr(clause, "element", None), "text", None)
    if not isinstance(sql, str):
        raise LookupError(f"db.money.{name} is not a text() statement")
    return sql


def substitute(sql: str, params: dict[str, str], *, where: str = "statement") -> str:
    """Replace each ``:name`` of ``sql`` by ``params[name]``.

    Raises:
      KeyError: A parameter of ``sql`` has no entry in ``params`` (the money path gained one).
    """
    missing = sorted({m for m in _PARAM.findall(sql) if m not in params})
    if missing:
        raise KeyError(
            f"{where} takes {', '.join(':' + m for m in missing)}: map it in bench/renewal_script.py STEPS"
        )
    return _PARAM.sub(lambda m: params[m.group(1)], sql)


def _clean(sql: str) -> str:
    return textwrap.dedent(sql).strip().rstrip(";")


def render(name: str) -> str:
    """The ``db.money`` statement ``name`` with its parameters mapped as :data:`STEPS` says."""
    params = dict(STEPS)[name]
    return substitute(_clean(statement_text(name)), params, where=f"db.money.{name}")


def generate() -> str:
    """The pgbench script (``bench/renewal.sql``) of one renewal, from :data:`STEPS`."""
    lines = [
        "-- One renewal as the money path runs it (db/sql/, through db.money), for pgbench -M prepared.",
        "-- GENERATED by `python -m bench.renewal_script --write` from db/sql/: do not edit.",
        "-- Variables: run, clients (= -c), subscriptions (bench subscriptions bsub-0..), seq (0).",
        "\\set n :client_id + :clients * random(0, :subscriptions / :clients - 1)",
        "\\set seq :seq + 1",
    ]
    for name, _params in STEPS:
        if name in ("BEGIN", "COMMIT"):
            lines.append(f"{name};")
            continue
        if name == "READ_SUBSCRIPTION":
            lines.append("-- in place of _SUBSCRIPTION_ACCOUNT: the owner and the period to charge")
            lines.append(_clean(_READ_SUBSCRIPTION) + " \\gset")
            continue
        lines.append(f"-- db.money.{name}")
        lines.append(render(name) + ";")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.renewal_script [--write]``: print the script, or write ``bench/renewal.sql``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.renewal_script", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--write", action="store_true", help=f"write {SCRIPT_PATH.name}")
    args = parser.parse_args(argv)
    script = generate()
    if args.write:
        SCRIPT_PATH.write_text(script)
        print(f"wrote {SCRIPT_PATH}")
    else:
        sys.stdout.write(script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
