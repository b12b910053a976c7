"""One exit-code convention for the ``billing`` CLI, through the real console script.

Bad input (a malformed option, an unknown id, an idempotency conflict) exits 2;
a dependency that is down or misconfigured (PostgreSQL, Redis) exits 1.  Either
way stderr holds exactly one line, ``billing: error: ...``, and no traceback.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.acceptance.test_cli import billing

USD = 1_000_000


def _one_error_line(result, code: int) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("billing: error: "), result.stderr
    return lines[0]


def _free_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _db_variant(services, kind: str) -> str:
    parts = urlsplit(services.database_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    user = parts.username or "postgres"
    if kind == "missing_database":
        return urlunsplit(parts._replace(path="/billing_no_such_database"))
    if kind == "unknown_role":
        return urlunsplit(parts._replace(netloc=f"billing_no_such_role@{host}:{port}"))
    if kind == "port_out_of_range":
        return urlunsplit(parts._replace(netloc=f"{user}@{host}:99999"))
    if kind == "at_in_password":
        return urlunsplit(parts._replace(netloc=f"{user}:p@ss@{host}:{port}"))
    if kind == "down":
        return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{_free_port()}"))
    raise AssertionError(kind)


DB_CASES = ["missing_database", "unknown_role", "port_out_of_range", "at_in_password", "down"]
DB_COMMANDS = [("account", "show", "a1"), ("audit",), ("ops", "failures"), ("db", "upgrade")]


@pytest.mark.parametrize("kind", DB_CASES)
@pytest.mark.parametrize("command", DB_COMMANDS, ids=lambda c: "-".join(c))
def test_a_broken_database_is_one_line_and_exit_1(services, kind, command):
    result = billing(*command, env={"BILLING_DATABASE_URL": _db_variant(services, kind)})
    line = _one_error_line(result, 1)
    assert "BILLING_DATABASE_URL" in line or "PostgreSQL" in line, line


def _redis_variant(services, kind: str) -> str:
    parts = urlsplit(services.redis_url)
    if kind == "down":
        return f"redis://127.0.0.1:{_free_port()}/0"
    if kind == "http_scheme":
        return urlunsplit(parts._replace(scheme="http"))
    if kind == "db_99":
        return urlunsplit(parts._replace(path="/99"))
    raise AssertionError(kind)


REDIS_CASES = ["down", "http_scheme", "db_99"]


def _redis_commands(message_id: str) -> list[tuple[str, ...]]:
    return [
        ("publish", "subscribe", "--account-id", "a1", "--plan-id", "pro", "--idempotency-key", "k1"),
        ("ops", "queues"),
        ("ops", "retry", message_id),
        ("scheduler", "--once", "--lead-time-ms", str(40 * 86_400_000)),  # a renewal is due
    ]


@pytest.mark.parametrize("kind", REDIS_CASES)
def test_a_broken_redis_is_one_line_and_exit_1_for_every_command_that_needs_it(
    services, db, setup, producer, drain, kind
):
    # a real dead-lettered failure, so that `ops retry` gets as far as Redis, and a subscription
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 50 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="late", plan_id="pro", idempotency_key="s1")
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s2")
    drain()
    (failure,) = db("SELECT message_id FROM failed_messages")
    before = db("SELECT status FROM failed_messages")
    for command in _redis_commands(failure["message_id"]):
        result = billing(*command, env={"BILLING_REDIS_URL": _redis_variant(services, kind)})
        line = _one_error_line(result, 1)
        assert "Redis" in line or "BILLING_REDIS_URL" in line, line
    assert db("SELECT status FROM failed_messages") == before  # nothing changed
    assert db("SELECT count(*) AS n FROM operator_actions") == [{"n": 0}]


@pytest.mark.parametrize(
    "args",
    [
        ("account", "show", "missing"),
        ("account", "credit", "missing", "--amount-micros", "100", "--idempotency-key", "c1"),
        ("account", "add-user-key", "missing"),
        ("account", "auto-top-up", "missing", "--disable"),
        ("subscription", "cancel", "sub_missing"),
        ("subscription", "cancel", "sub_missing", "--undo"),
        ("ops", "retry", "no-such-message"),
        ("ops", "show", "no-such-message"),
        ("ops", "replay", "no-such-message", "--new-key", "k2", "--yes"),
    ],
    ids=lambda a: "-".join(a[:2]),
)
def test_an_unknown_id_is_bad_input_exit_2(services, db, args):
    _one_error_line(billing(*args), 2)
    assert db("SELECT count(*) AS n FROM ledger_entries") == [{"n": 0}]
    assert db("SELECT count(*) AS n FROM api_keys") == [{"n": 0}]
    # an operator's attempt may be audit-logged, but it acted on nothing
    assert db("SELECT coalesce(sum(count), 0) AS n FROM operator_actions") == [{"n": 0}]


def test_a_credit_key_reused_with_another_amount_or_account_is_a_conflict(services, db, setup):
    setup(accounts=[{"account_id": "a1", "balance_micros": 0}, {"account_id": "a2", "balance_micros": 0}])
    first = billing("account", "credit", "a1", "--amount-micros", "100", "--idempotency-key", "c1")
    assert first.returncode == 0, first.stderr
    same = billing("account", "credit", "a1", "--amount-micros", "100", "--idempotency-key", "c1")
    assert same.returncode == 0 and "already credited" in same.stdout, same.stderr

    other_amount = billing("account", "credit", "a1", "--amount-micros", "200", "--idempotency-key", "c1")
    line = _one_error_line(other_amount, 2)
    assert "c1" in line and "100" in line and "200" in line and "conflict" in line, line
    other_account = billing("account", "credit", "a2", "--amount-micros", "100", "--idempotency-key", "c1")
    line = _one_error_line(other_account, 2)
    assert "a1" in line and "conflict" in line, line

    assert other_amount.stdout == "" and other_account.stdout == ""
    assert db("SELECT id, balance_micros FROM accounts ORDER BY id") == [
        {"id": "a1", "balance_micros": 100},
        {"id": "a2", "balance_micros": 0},
    ]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE idempotency_key = 'credit:c1'") == [{"n": 1}]
