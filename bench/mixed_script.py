"""The pgbench scripts of the mixed workload's four kinds, from the money path's own SQL: the mixed limit.

``make bench``'s setup ``mixed_limit`` runs these four scripts with pgbench
(``-f <kind>.sql@1`` each: every transaction draws one of them, a quarter
each on average), at the workers' concurrency, as :mod:`bench.renewal_script`
does for the renewal: the statements ``billing worker`` runs for one
message of each kind, in order, with none of the worker around them.  As
there, the statements are not copied: each is the named block of
``db/sql/`` (:data:`db.sql.queries`; the fake provider's charge is
``workers.providers.fake._CHARGE``), with each ``:name`` parameter replaced
by a pgbench variable or an SQL expression (:data:`SCRIPTS`), so the
scripts follow ``db/sql/`` by construction.  ``bench/mixed_limit/`` holds
the committed output of the three kinds of its own (the renewal's is
``bench/renewal.sql``, not a second copy); ``tests/unit/test_bench_mixed_script.py``
fails when it is stale (``python -m bench.mixed_script --write`` regenerates it).

Per kind (the bench's case: balances far above every price and threshold,
no funds waits, no public key for sealed key delivery):

* ``subscribe``: claim the key (autocommit); then lock the key, lock the
  account, read the plan, look for a live subscription, insert the
  subscription, post the ledger entry, insert the api key, look up the
  key's recipient, project the entitlement, complete the key.
* ``renew``: :data:`bench.renewal_script.STEPS` (the statement-by-statement
  renewal of ``db.money.apply_renew``).
* ``auto_top_up``: claim the key; phase 1 (lock the key, the attempt of
  the message, lock the account, the period's top-ups, insert the attempt);
  phase 2 (the charge lease in autocommit, then the fake provider's charge
  in its own transaction); phase 3 (lock the key, lock the account, lock the
  attempt, post the credit, mark it succeeded, reset the declines, resume
  the waits, complete the key).
* ``revoke_key``: claim the key; lock the key, the subscription's owner,
  lock the account, revoke its managed keys, complete the key.

What the scripts leave out: the branches a message does not take in the
bench (already active, insufficient funds, declines), the outcome details
that need a statement's answer (``key_ids`` of a revoke), and the
subscription's period arithmetic beyond the daily plan the bench uses (its
end is ``now + interval_count days``).  Each subscribe takes the next
account of the client's own share (:data:`SUBSCRIBE_ACCOUNT`), so a
measurement subscribes each account at most once to its plan (``mixplan``)
as long as a client runs fewer subscribes than its share holds
(``subscriptions / clients``: 312 per client at 10,000 accounts and 32 clients).

Variables: ``run`` (unique to the measurement), ``clients`` (``-c``),
``subscriptions`` (bench accounts, numbered from 0), ``mixplan`` (a plan
no account has a live subscription to), ``seq`` and ``subs`` (0; per-client
counters kept across a client's transactions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from db.sql import queries

from . import renewal_script
from .data import TOP_UP_AMOUNT_MICROS
from .renewal_script import substitute

__all__ = ["COMMITTED_KINDS", "KINDS", "SCRIPTS", "SCRIPT_DIR", "generate", "generate_all", "write"]

SCRIPT_DIR = Path(__file__).resolve().parent / "mixed_limit"
#: The kinds, in the order of the mixed workload.
KINDS = ("subscribe", "renew", "auto_top_up", "revoke_key")
#: The kinds committed in :data:`SCRIPT_DIR`: the renewal's script is committed as ``bench/renewal.sql``.
COMMITTED_KINDS = tuple(k for k in KINDS if k != "renew")

_KEY = renewal_script._KEY
_ID = "CAST(:run AS text) || ':' || CAST(:client_id AS text) || ':' || CAST(:seq AS text)"
_NOW = "now()"
#: The account a transaction works on: a random one of the client's share (as the renewal's ``n``).
_ACCOUNT = "('bacct-' || CAST(:n AS text))"
#: A subscribe's account: the next of the client's share, so no account subscribes twice to ``mixplan``.
SUBSCRIBE_ACCOUNT = "('bacct-' || CAST(:sn AS text))"
_SUB = f"('sub_pgb:' || {_ID})"
_ATTEMPT = f"('tua_pgb:' || {_ID})"
#: ``billing-queue:top-up:{attempt}``, split so that no ``:name`` is in a literal (pgbench would take it for a variable)
_PROVIDER_KEY = f"('billing-queue:' || 'top-up:' || {_ATTEMPT})"
_PERIOD_END = "(date_trunc('second', now()) + make_interval(days => CAST(:plan_interval_count AS int)))"
_PERIOD = "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM')"


def _claim(kind: str, account: str) -> tuple[str, dict[str, str]]:
    return (
        "claim_keys",
        {
            "keys": f"ARRAY[{_KEY}]",
            "kinds": f"ARRAY['{kind}']",
            "fingerprints": f"ARRAY['pgbench-{kind}']",
            "account_ids": f"ARRAY[{account}]" if account != "NULL" else "ARRAY[NULL]",
            "message_ids": f"ARRAY[{_KEY}]",
            "requests": f'ARRAY[\'{{"actor_name": "{kind}"}}\']',
            "lease_expires_at": "now() + interval '15 minutes'",
        },
    )


def _complete(result: str, account: str) -> tuple[str, dict[str, str]]:
    return (
        "complete_key",
        {"key": _KEY, "status": "'completed'", "result": result, "account_id": account, "now": _NOW},
    )


_LOCK_KEY: tuple[str, dict[str, str]] = ("lock_key", {"key": _KEY})
_BEGIN: tuple[str, dict[str, str]] = ("BEGIN", {})
_COMMIT: tuple[str, dict[str, str]] = ("COMMIT", {})

#: kind -> its statements in order: (``db/sql`` block name, or ``BEGIN``/``COMMIT``, or
#: ``fake_provider_charge``; parameter -> pgbench variable or SQL; a trailing ``\\gset`` prefix, if any).
SCRIPTS: dict[str, list[tuple[str, dict[str, str]] | tuple[str, dict[str, str], str]]] = {
    "subscribe": [
        _claim("subscribe", SUBSCRIBE_ACCOUNT),
        _BEGIN,
        _LOCK_KEY,
        ("lock_account", {"account_id": SUBSCRIBE_ACCOUNT}),
        ("plan", {"plan_id": ":mixplan"}, "plan_"),
        ("live_subscription", {"account_id": SUBSCRIBE_ACCOUNT, "plan_id": ":plan_id"}),
        (
            "insert_subscription",
            {
                "id": _SUB,
                "account_id": SUBSCRIBE_ACCOUNT,
                "plan_id": ":plan_id",
                "anchor": "date_trunc('second', now())",
                "start": "date_trunc('second', now())",
                "end": _PERIOD_END,
                "key": _KEY,
                "now": _NOW,
            },
        ),
        (
            "post_ledger_entry",
            {
                "account_id": SUBSCRIBE_ACCOUNT,
                "amount_micros": "-CAST(:plan_price_micros AS bigint)",
                "kind": "'subscription_charge'",
                "subscription_id": _SUB,
                "period_start": "date_trunc('second', now())",
                "top_up_attempt_id": "NULL",
                "idempotency_key": f"('subscribe:' || {_KEY})",
                "now": _NOW,
            },
        ),
        (
            "insert_api_key",
            {
                "id": f"('key_pgb:' || {_ID})",
                "account_id": SUBSCRIBE_ACCOUNT,
                "subscription_id": _SUB,
                "source": "'managed'",
                "prefix": f"('bq_' || left(md5({_KEY}), 12))",  # unique, as the project's random prefix
                "key_hash": f"md5({_KEY})",
                "now": _NOW,
            },
        ),
        ("key_recipient", {"account_id": SUBSCRIBE_ACCOUNT}),
        (
            "upsert_entitlement",
            {
                "account_id": SUBSCRIBE_ACCOUNT,
                "plan_id": ":plan_id",
                "subscription_id": _SUB,
                "status": "'active'",
                "entitled": "true",
                "current_period_end": _PERIOD_END,
                "grace_ends_at": "NULL",
                "now": _NOW,
            },
        ),
        _complete(
            f"jsonb_build_object('outcome', 'subscribed', 'subscription_id', {_SUB}, "
            f"'charged_micros', CAST(:plan_price_micros AS bigint), 'current_period_end', {_PERIOD_END})",
            SUBSCRIBE_ACCOUNT,
        ),
        _COMMIT,
    ],
    "auto_top_up": [
        _claim("auto_top_up", _ACCOUNT),
        # phase 1: the attempt and its provider key
        _BEGIN,
        _LOCK_KEY,
        ("attempt_of_message", {"key": _KEY}),
        ("lock_account", {"account_id": _ACCOUNT}),
        ("period_top_ups", {"account_id": _ACCOUNT, "period": _PERIOD}),
        (
            "insert_attempt",
            {
                "id": _ATTEMPT,
                "account_id": _ACCOUNT,
                "key": _KEY,
                "provider_key": _PROVIDER_KEY,
                "amount_micros": str(TOP_UP_AMOUNT_MICROS),
                "currency": "'USD'",
                "payment_method_ref": "'pm_card_visa'",
                "period": _PERIOD,
                "reason": "'bench'",
                "now": _NOW,
                "reconcile_after": "now() + interval '10 minutes'",
            },
        ),
        _COMMIT,
        # phase 2: the charge lease (autocommit), then the provider's charge (its own transaction)
        (
            "take_charge_lease",
            {
                "id": _ATTEMPT,
                "until": "now() + interval '2 minutes'",
                "now": _NOW,
                "window_start": "now() - interval '24 hours'",
            },
        ),
        (
            "fake_provider_charge",
            {
                "key": _PROVIDER_KEY,
                "charge_id": f"('ch_fake_pgb:' || {_ID})",
                "payment_method_ref": "'pm_card_visa'",
                "amount_micros": str(TOP_UP_AMOUNT_MICROS),
                "currency": "'USD'",
                "status": "'succeeded'",
                "decline_code": "NULL",
                "settles_as": "NULL",
                "settles_at": "NULL",
                "now": _NOW,
            },
        ),
        # phase 3: the answer recorded, the ledger credited, the waits resumed
        _BEGIN,
        _LOCK_KEY,
        ("lock_account", {"account_id": _ACCOUNT}),
        ("lock_attempt", {"id": _ATTEMPT}),
        (
            "post_ledger_entry",
            {
                "account_id": _ACCOUNT,
                "amount_micros": str(TOP_UP_AMOUNT_MICROS),
                "kind": "'top_up'",
                "subscription_id": "NULL",
                "period_start": "NULL",
                "top_up_attempt_id": _ATTEMPT,
                "idempotency_key": f"('top_up:' || {_ATTEMPT})",
                "now": _NOW,
            },
        ),
        ("attempt_succeeded", {"id": _ATTEMPT, "charge_id": f"('ch_fake_pgb:' || {_ID})", "now": _NOW}),
        ("declines_reset", {"id": _ACCOUNT}),
        (
            "resume_waits",
            {"account_id": _ACCOUNT, "lease_expires_at": "now() + interval '15 minutes'", "now": _NOW},
        ),
        _complete(
            f"jsonb_build_object('outcome', 'topped_up', 'attempt_id', {_ATTEMPT}, "
            f"'amount_micros', {TOP_UP_AMOUNT_MICROS})",
            _ACCOUNT,
        ),
        _COMMIT,
    ],
    "revoke_key": [
        _claim("revoke_key", "NULL"),
        _BEGIN,
        _LOCK_KEY,
        ("subscription_owner", {"subscription_id": "('bsub-' || CAST(:n AS text))"}, "owner_"),
        ("lock_account", {"account_id": ":owner_account_id"}),
        (
            "revoke_managed",
            {"subscription_id": "('bsub-' || CAST(:n AS text))", "now": _NOW, "reason": "'bench'"},
        ),
        _complete(
            "jsonb_build_object('outcome', 'revoked', 'account_id', CAST(:owner_account_id AS text))",
            ":owner_account_id",
        ),
        _COMMIT,
    ],
}


def _text(name: str) -> str:
    if name == "fake_provider_charge":
        from workers.providers.fake import _CHARGE  # the provider's side: not db/sql

        return str(_CHARGE.text).strip()
    if name not in queries:
        raise LookupError(f"db/sql has no block {name!r} any more: map the new one in bench/mixed_script.py")
    return queries[name]


def generate(kind: str) -> str:
    """The pgbench script of one ``kind`` message (``renew``: :func:`bench.renewal_script.generate`).

    Raises:
      KeyError: A statement takes a parameter :data:`SCRIPTS` does not map (the money path gained one).
      LookupError: A block of :data:`SCRIPTS` is gone from ``db/sql``.
    """
    if kind == "renew":
        return renewal_script.generate()
    lines = [
        f"-- One {kind} message as the money path runs it (db/sql/), for pgbench -M prepared.",
        "-- GENERATED by `python -m bench.mixed_script --write` from db/sql/: do not edit.",
        "-- Variables: run, clients (= -c), subscriptions (bench accounts bacct-0..), mixplan, seq and subs (0).",
        "\\set n :client_id + :clients * random(0, :subscriptions / :clients - 1)",
        "\\set seq :seq + 1",
    ]
    if kind == "subscribe":
        lines += [
            "\\set subs :subs + 1",
            "\\set sn :client_id + :clients * (:subs % (:subscriptions / :clients))",
        ]
    for step in SCRIPTS[kind]:
        name, params = step[0], step[1]
        if name in ("BEGIN", "COMMIT"):
            lines.append(f"{name};")
            continue
        gset = f" \\gset {step[2]}" if len(step) == 3 else ""  # type: ignore[misc]
        lines.append(f"-- db/sql: {name}")
        lines.append(substitute(_text(name), params, where=name) + (gset or ";"))
    return "\n".join(lines) + "\n"


def generate_all(kinds: tuple[str, ...] = KINDS) -> dict[str, str]:
    """Each of ``kinds``' scripts, by file name (``<kind>.sql``)."""
    return {f"{kind}.sql": generate(kind) for kind in kinds}


def write(directory: Path, kinds: tuple[str, ...] = KINDS) -> list[Path]:
    """Write the scripts of ``kinds`` into ``directory`` (created); returns their paths in that order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in generate_all(kinds).items():
        path = directory / name
        path.write_text(text)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.mixed_script [--write]``: print the scripts, or write ``bench/mixed_limit/``."""
    parser = argparse.ArgumentParser(prog="python -m bench.mixed_script", description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {SCRIPT_DIR.name}/<kind>.sql")
    args = parser.parse_args(argv)
    if args.write:
        for path in write(SCRIPT_DIR, COMMITTED_KINDS):
            print(f"wrote {path}")
    else:
        for name, text in generate_all().items():
            sys.stdout.write(f"-- ===== {name}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
