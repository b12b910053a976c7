"""``billing reconcile``: the provider's charges against our attempts and credits, both ways.

The fake provider through the real worker and the CLI as an operator runs
it; Stripe through :func:`workers.reconcile.reconcile` on recorded list pages
(``tests/fixtures/stripe/payment_intent_list_*.json``).  Each is tested both
ways: clean after real top-ups, and each corruption reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe

from tests.conftest import CLOCK_START, ROOT
from tests.unit.test_stripe_provider import RecordedStripeHTTPClient

USD = 1_000_000
KEY = "billing-queue:top-up:"


def billing(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def reconcile_json(since: datetime, until: datetime, *extra: str) -> tuple[int, dict[str, Any]]:
    done = billing("reconcile", "--since", since.isoformat(), "--until", until.isoformat(), "--json", *extra)
    assert done.returncode in (0, 3), done.stderr
    return done.returncode, json.loads(done.stdout)


def found(report: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m["kind"], m["attempt_id"] or m["charge_id"]) for m in report["mismatches"]}


def _account(account_id: str, card: str) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "balance_micros": 0,
        "auto_top_up_threshold_micros": 1 * USD,
        "auto_top_up_amount_micros": 20 * USD,
        "payment_method_ref": card,
    }


def _top_ups_through_the_worker(setup, producer, drain) -> None:
    setup(
        accounts=[
            _account("a_ok", "pm_card_visa"),
            _account("a_two", "pm_card_visa"),
            _account("a_dec", "pm_decline_card"),
            _account("a_proc", "pm_processing"),
        ]
    )
    for account in ("a_ok", "a_two", "a_dec", "a_proc"):
        producer.auto_top_up(account_id=account, idempotency_key=f"manual:{account}")
    drain()


def _attempt(
    db,
    account_id: str,
    account: str,
    *,
    amount: int,
    status: str,
    charge_id: str | None,
    at: datetime,
    credit: int | None = None,
) -> None:
    """A top-up attempt (and its credit) written straight into the tables, as a corruption or a Stripe record."""
    db(
        """
        INSERT INTO top_up_attempts (id, account_id, message_idempotency_key, provider_idempotency_key, amount_micros,
            currency, payment_method_ref, billing_period, status, recovery_point, provider_charge_id, created_at,
            updated_at)
        VALUES ($1, $2, 'msg:' || $1, $3, $4, 'USD', 'cus_RkT2x9QvLm3Ab1/pm_1QxR1aLkdIwHu7ixVb4Kc9Ze',
            to_char($6::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM'), $5,
            CASE WHEN $5 = 'pending' THEN 'started' ELSE 'finished' END, $7, $6, $6)
        """,
        account_id,
        account,
        KEY + account_id,
        amount,
        status,
        at,
        charge_id,
    )
    if credit is not None:
        db(
            """
            INSERT INTO ledger_entries (account_id, amount_micros, kind, top_up_attempt_id, idempotency_key, created_at)
            VALUES ($1, $2, 'top_up', $3, 'top-up:' || $3, $4)
            """,
            account,
            credit,
            account_id,
            at,
        )
        db("UPDATE accounts SET balance_micros = balance_micros + $2 WHERE id = $1", account, credit)


def _window() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(hours=1), now + timedelta(hours=1)


# --------------------------------------------------------------------------- the fake provider, through the CLI


def test_reconcile_is_clean_after_real_top_ups_through_the_worker(services, setup, producer, drain, db):
    _top_ups_through_the_worker(setup, producer, drain)
    assert sorted(r["status"] for r in db("SELECT status FROM top_up_attempts")) == [
        "declined",
        "pending",  # pm_processing: the provider is still processing it
        "succeeded",
        "succeeded",
    ]
    since, until = _window()

    code, report = reconcile_json(since, until)

    assert code == 0, report
    assert report["ok"] is True and report["mismatches"] == []
    assert (report["provider"], report["charges"], report["attempts"], report["in_flight"]) == (
        "fake",
        4,
        4,
        1,
    )
    table = billing("reconcile", "--since", since.isoformat(), "--until", until.isoformat())
    assert table.returncode == 0, table.stderr
    assert "ok: the provider's charges and our attempts and credits agree" in table.stdout
    # outside the window there is nothing to compare
    code, report = reconcile_json(since - timedelta(days=3), since - timedelta(days=2))
    assert (code, report["charges"], report["attempts"]) == (0, 0, 0)


def test_reconcile_reports_each_corruption_both_ways(services, setup, producer, drain, db):
    _top_ups_through_the_worker(setup, producer, drain)
    attempts = {r["account_id"]: r for r in db("SELECT * FROM top_up_attempts")}
    now = datetime.now(UTC)
    # a credit with no provider charge behind it (today's audit only asks that a charge id be set)
    _attempt(
        db,
        "tua_ghost",
        "a_ok",
        amount=5 * USD,
        status="succeeded",
        charge_id="ch_ghost",
        at=now,
        credit=5 * USD,
    )
    # a provider charge under our key that no attempt knows: the card charged, nothing credited
    db(
        """
        INSERT INTO fake_provider_charges (idempotency_key, charge_id, payment_method_ref, amount_micros, currency,
            status, created_at)
        VALUES ($1, 'ch_nobody', 'pm_card_visa', 7000000, 'USD', 'succeeded', $2)
        """,
        KEY + "tua_nobody",
        now,
    )
    # the provider took another amount than the one credited
    db(
        "UPDATE fake_provider_charges SET amount_micros = amount_micros + 1 WHERE idempotency_key = $1",
        attempts["a_ok"]["provider_idempotency_key"],
    )
    # one charge credited twice: a second credited attempt resting on a_two's charge
    two = attempts["a_two"]
    db("UPDATE top_up_attempts SET provider_charge_id = NULL WHERE id = $1", two["id"])
    _attempt(
        db,
        "tua_twin",
        "a_two",
        amount=20 * USD,
        status="succeeded",
        charge_id=two["provider_charge_id"],
        at=now,
        credit=20 * USD,
    )
    # the provider says it took the money of an attempt we recorded as declined
    db(
        "UPDATE fake_provider_charges SET status = 'succeeded', decline_code = NULL WHERE idempotency_key = $1",
        attempts["a_dec"]["provider_idempotency_key"],
    )
    since, until = _window()

    code, report = reconcile_json(since, until)

    assert code == 3
    assert report["ok"] is False
    assert found(report) == {
        ("credit_without_charge", "tua_ghost"),
        ("charge_without_attempt", "ch_nobody"),
        ("amount_mismatch", attempts["a_ok"]["id"]),
        ("charge_credited_twice", two["id"]),
        ("charge_not_credited", attempts["a_dec"]["id"]),
    }
    mismatch = {m["kind"]: m for m in report["mismatches"]}["amount_mismatch"]
    assert (
        mismatch["provider_amount_micros"],
        mismatch["attempt_amount_micros"],
        mismatch["credited_micros"],
    ) == (
        20 * USD + 1,
        20 * USD,
        20 * USD,
    )
    table = billing("reconcile", "--since", since.isoformat(), "--until", until.isoformat())
    assert table.returncode == 3
    assert "5 mismatches" in table.stdout
    for kind, _ in found(report):
        assert kind in table.stdout
    # read-only: nothing was settled or written
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'top_up'") == [{"n": 4}]


def test_settle_credits_a_charge_whose_answer_never_came(services, setup, producer, drain, db, clock):
    # the provider charges, then never answers: the attempt stays pending until reconciled
    setup(accounts=[_account("a_silent", "pm_silent_charge")])
    producer.auto_top_up(account_id="a_silent", idempotency_key="manual:a_silent")
    drain()
    assert [r["status"] for r in db("SELECT status FROM top_up_attempts")] == ["pending"]
    assert [r["status"] for r in db("SELECT status FROM fake_provider_charges")] == ["succeeded"]
    start = datetime.fromisoformat(CLOCK_START)
    since, until = start - timedelta(hours=1), start + timedelta(hours=1)
    attempt_id = db("SELECT id FROM top_up_attempts")[0]["id"]

    code, report = reconcile_json(since, until)
    assert code == 3
    assert found(report) == {("charge_not_settled", attempt_id)}
    assert report["settled"] is None

    code, report = reconcile_json(since, until, "--settle")
    assert code == 0, report
    assert report["settled"]["taken"] == 1
    assert report["settled"]["reconciler"]["settled"] == {"succeeded": 1}
    assert db("SELECT status FROM top_up_attempts") == [{"status": "succeeded"}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 20 * USD}]
    # settled once: a second --settle has nothing left to take
    code, report = reconcile_json(since, until, "--settle")
    assert (code, report["settled"]["taken"]) == (0, 0)
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'top_up'") == [{"n": 1}]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--since", "yesterday", "--until", "2026-01-02T00:00:00Z"),
            "--since must be an ISO 8601 timestamp",
        ),
        (("--since", "2026-01-01T00:00:00", "--until", "2026-01-02T00:00:00Z"), "--since needs a UTC offset"),
        (("--since", "2026-01-02", "--until", "2026-01-01"), "--since must be before --until"),
    ],
)
def test_a_bad_window_is_bad_input(services, args, message):
    done = billing("reconcile", *args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


# --------------------------------------------------------------------------- Stripe, on recorded list pages

SINCE = datetime(2026, 1, 1, tzinfo=UTC)
UNTIL = datetime(2026, 1, 2, tzinfo=UTC)
AT = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)  # the recorded PaymentIntents are created from 01:00 on
PI_A, PI_B, PI_C = "pi_3QyA1aLkdIwHu7ix0Aa1Aa1A", "pi_3QyB2bLkdIwHu7ix0Bb2Bb2B", "pi_3QyC3cLkdIwHu7ix0Cc3Cc3C"


def _stripe_reconcile(services, *pages: str) -> Any:
    from db.engine import make_engine
    from workers.providers import StripePaymentProvider
    from workers.reconcile import reconcile

    http = RecordedStripeHTTPClient(*((200, page) for page in pages))

    async def go() -> Any:
        engine = make_engine(services.database_url, pool_size=2)
        try:
            provider = StripePaymentProvider("sk_test_4eC39HqLyjWDarjtT1zdp7dc", http_client=http)
            return await reconcile(engine, provider, since=SINCE, until=UNTIL)
        finally:
            await engine.dispose()

    report = asyncio.run(go())
    assert not http.responses, "every recorded page was read"
    return report


@pytest.fixture
def _no_stripe_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stripe, "enable_telemetry", False)


@pytest.mark.usefixtures("_no_stripe_telemetry")
def test_stripe_reconcile_is_clean_when_every_payment_intent_matches(services, setup, db):
    setup(accounts=[{"account_id": "acct_s", "balance_micros": 0}])
    _attempt(
        db,
        "tua_stripe_a",
        "acct_s",
        amount=20 * USD,
        status="succeeded",
        charge_id=PI_A,
        at=AT,
        credit=20 * USD,
    )
    _attempt(
        db,
        "tua_stripe_b",
        "acct_s",
        amount=15 * USD,
        status="succeeded",
        charge_id=PI_B,
        at=AT,
        credit=15 * USD,
    )
    _attempt(db, "tua_stripe_c", "acct_s", amount=30 * USD, status="declined", charge_id=PI_C, at=AT)

    report = _stripe_reconcile(services, "payment_intent_list_page1.json", "payment_intent_list_page2.json")

    assert report.ok, report.mismatches
    # the PaymentIntent without our metadata key is someone else's
    assert (report.provider, report.charges, report.attempts) == ("stripe", 3, 3)


@pytest.mark.usefixtures("_no_stripe_telemetry")
def test_stripe_reconcile_finds_a_credit_with_no_payment_intent_behind_it(services, setup, db):
    setup(accounts=[{"account_id": "acct_s", "balance_micros": 0}])
    # credited 25 where Stripe charged 20
    _attempt(
        db,
        "tua_stripe_a",
        "acct_s",
        amount=25 * USD,
        status="succeeded",
        charge_id=PI_A,
        at=AT,
        credit=25 * USD,
    )
    # no attempt for PI_B: Stripe charged 15 that nobody credited
    _attempt(db, "tua_stripe_c", "acct_s", amount=30 * USD, status="declined", charge_id=PI_C, at=AT)
    # a credit whose charge id Stripe has never heard of: today's audit passes it
    _attempt(
        db,
        "tua_stripe_d",
        "acct_s",
        amount=5 * USD,
        status="succeeded",
        charge_id="pi_ghost",
        at=AT,
        credit=5 * USD,
    )

    report = _stripe_reconcile(services, "payment_intent_list_page1.json", "payment_intent_list_page2.json")

    assert not report.ok
    assert {(m.kind, m.attempt_id or m.charge_id) for m in report.mismatches} == {
        ("amount_mismatch", "tua_stripe_a"),
        ("charge_without_attempt", PI_B),
        ("credit_without_charge", "tua_stripe_d"),
    }


@pytest.mark.usefixtures("_no_stripe_telemetry")
def test_stripe_reconcile_finds_a_key_that_took_money_twice(services, setup, db):
    # e.g. a charge sent again under a key older than Stripe's 24 h window: a new PaymentIntent
    setup(accounts=[{"account_id": "acct_s", "balance_micros": 0}])
    _attempt(
        db,
        "tua_stripe_a",
        "acct_s",
        amount=20 * USD,
        status="succeeded",
        charge_id=PI_A,
        at=AT,
        credit=20 * USD,
    )

    report = _stripe_reconcile(services, "payment_intent_list_duplicate.json")

    assert [(m.kind, m.charge_id, m.attempt_id) for m in report.mismatches] == [
        ("duplicate_charge", "pi_3QyA2dLkdIwHu7ix0Dd2Dd2D", "tua_stripe_a")
    ]
