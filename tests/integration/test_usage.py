"""Usage-based billing (``record_usage``): metered debits against the prepaid balance.

Real PostgreSQL and Redis.  The end-to-end tests publish with the producer
and drain the session's in-process worker; the hot-account tests drive
:class:`BillingService` directly, with the events of one account handed in
together (``asyncio.gather``) so the group commit takes them as a batch, on
real concurrent connections; crashes are simulated at the exact step.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import redis
from sqlalchemy import text

from tasks.errors import IdempotencyConflict, MessageValidationError, UnknownAccount
from tests.conftest import ROOT
from workers.billing import BillingService, Delivery
from workers.crash import SimulatedCrash

USD = 1_000_000


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``billing ARGS`` as an operator runs it (the test session's database and Redis)."""
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _usage(account: str, amount: int, key: str, **extra: Any) -> dict[str, Any]:
    return {"account_id": account, "amount_micros": amount, "idempotency_key": key, **extra}


def _service(services: Any, **kw: Any) -> BillingService:
    from db.engine import make_engine
    from workers.providers import FakePaymentProvider

    engine = make_engine(services.database_url, pool_size=20)
    return BillingService(engine=engine, provider=FakePaymentProvider(engine), **kw)


async def _q(service: BillingService, sql: str, **params: Any) -> list[dict[str, Any]]:
    async with service.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(text(sql), params)).mappings().all()]


def _account(db: Any, account: str) -> dict[str, Any]:
    (row,) = db(
        "SELECT a.balance_micros, a.owed_micros, e.has_credits FROM accounts a"
        " LEFT JOIN account_entitlements e ON e.account_id = a.id WHERE a.id = $1",
        account,
    )
    return row


# ---------------------------------------------------------------------------- end to end


def test_usage_is_debited_then_owed_then_collected_by_the_next_credit(
    setup, producer, drain, db, audit, services
):
    from db import money
    from db.engine import make_engine, transaction
    from workers.clock import SystemClock

    setup(accounts=[{"account_id": "a1", "balance_micros": 10 * USD}])
    assert _account(db, "a1") == {"balance_micros": 10 * USD, "owed_micros": 0, "has_credits": True}

    producer.record_usage(
        account_id="a1",
        amount_micros=3 * USD,
        idempotency_key="ev-1",
        meter="llm.tokens",
        quantity=1200,
        occurred_at="2026-12-01T10:00:00Z",
    )
    producer.record_usage(
        account_id="a1",
        amount_micros=3 * USD,
        idempotency_key="ev-1",
        meter="llm.tokens",
        quantity=1200,
        occurred_at="2026-12-01T10:00:00Z",
    )  # the same event again
    drain()
    assert _account(db, "a1") == {"balance_micros": 7 * USD, "owed_micros": 0, "has_credits": True}

    producer.record_usage(account_id="a1", amount_micros=10 * USD, idempotency_key="ev-2", meter="sms.sent")
    drain()
    # usage is never refused: 7 charged, 3 owed, the flag flips in the same transaction
    assert _account(db, "a1") == {"balance_micros": 0, "owed_micros": 3 * USD, "has_credits": False}
    (event,) = db(
        "SELECT amount_micros, charged_micros, owed_micros, meter FROM usage_events WHERE idempotency_key = 'ev-2'"
    )
    assert event == {
        "amount_micros": 10 * USD,
        "charged_micros": 7 * USD,
        "owed_micros": 3 * USD,
        "meter": "sms.sent",
    }
    assert audit(quiescent=True) == {}

    async def credit() -> None:
        engine = make_engine(services.database_url, pool_size=1)
        try:
            async with transaction(engine) as conn:
                await money.credit_account(
                    conn,
                    account_id="a1",
                    amount_micros=5 * USD,
                    idempotency_key="support-1",
                    now=SystemClock().now(),
                )
        finally:
            await engine.dispose()

    asyncio.run(credit())
    # the credit collected the owed 3 first, in its own transaction
    assert _account(db, "a1") == {"balance_micros": 2 * USD, "owed_micros": 0, "has_credits": True}
    assert db(
        "SELECT kind, amount_micros, idempotency_key FROM ledger_entries WHERE account_id = 'a1' ORDER BY id"
    ) == [
        {"kind": "adjustment", "amount_micros": 10 * USD, "idempotency_key": "account-opening:a1"},
        {"kind": "usage_charge", "amount_micros": -3 * USD, "idempotency_key": "usage:ev-1"},
        {"kind": "usage_charge", "amount_micros": -7 * USD, "idempotency_key": "usage:ev-2"},
        {"kind": "adjustment", "amount_micros": 5 * USD, "idempotency_key": "credit:support-1"},
        {"kind": "usage_charge", "amount_micros": -3 * USD, "idempotency_key": "owed:credit:support-1"},
    ]
    assert db("SELECT count(*) AS n FROM usage_events") == [{"n": 2}]
    assert audit(quiescent=True) == {}
    # operators find an event by its key: the key's outcome and the event's own row
    found = json.loads(cli("ops", "key", "ev-2", "--json").stdout)
    assert found["kind"] == "record_usage" and found["status"] == "completed"
    assert (
        found["usage_event"]["charged_micros"] == 7 * USD and found["usage_event"]["owed_micros"] == 3 * USD
    )


def test_account_show_gives_owed_has_credits_and_usage_by_day_and_meter(setup, producer, drain):
    setup(accounts=[{"account_id": "a1", "balance_micros": 1 * USD}])
    producer.record_usage_many(
        [
            _usage("a1", USD // 2, "e1", meter="llm.tokens", quantity=10),
            _usage("a1", USD // 2, "e2", meter="llm.tokens", quantity=5),
            _usage("a1", USD, "e3", meter="sms.sent"),
        ]
    )
    drain()
    shown = json.loads(cli("account", "show", "a1", "--json").stdout)
    assert shown["account"]["owed_micros"] == USD and shown["account"]["has_credits"] is False
    by_meter = {u["meter"]: u for u in shown["usage"]}
    assert by_meter["llm.tokens"]["events"] == 2 and by_meter["llm.tokens"]["quantity"] == 15
    assert by_meter["llm.tokens"]["amount_micros"] == USD
    assert by_meter["sms.sent"]["amount_micros"] == USD
    text_out = cli("account", "show", "a1").stdout
    assert "owed 1,000,000 micros" in text_out and "has_credits False" in text_out


def test_record_usage_many_is_one_redis_round_trip_and_refuses_a_bad_batch_whole(services, monkeypatch):
    from redis.connection import AbstractConnection

    from tasks.producer import Producer

    # a producer service's own Producer (Dramatiq's stock RedisBroker), on a database no worker reads
    url = services.redis_db(2)
    producer = Producer(url)
    client = redis.Redis.from_url(url)
    producer.broker.client.ping()  # the connection's handshake (HELLO, SELECT) is not the batch's
    # every write to Redis on this database, one per round trip (the server's command stats are
    # shared with the session's worker, whose connections use other databases)
    sent: list[bytes] = []
    real_send = AbstractConnection.send_packed_command

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        if self.db == producer.broker.client.connection_pool.connection_kwargs.get("db"):
            sent.append(b"".join(command) if isinstance(command, list) else command)
        real_send(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", send)
    ids = producer.record_usage_many([_usage("a1", 10 + i, f"batch-{i}") for i in range(50)])
    monkeypatch.undo()
    assert len(ids) == len(set(ids)) == 50
    assert len(sent) == 1, sent  # one round trip: MULTI, one HSET, one RPUSH, EXEC; no script per message
    assert sent[0].count(b"MULTI") == 1 and sent[0].count(b"HSET") == 1 and sent[0].count(b"RPUSH") == 1
    assert b"EVALSHA" not in sent[0] and b"EXEC" in sent[0]
    assert client.llen("dramatiq:billing.usage") == 50

    with pytest.raises(MessageValidationError, match="event 1: .*amount_micros"):
        producer.record_usage_many([_usage("a1", 5, "ok-1"), _usage("a1", 1.5, "bad-1")])
    assert client.llen("dramatiq:billing.usage") == 50  # nothing of the bad batch
    body = json.loads(client.hget("dramatiq:billing.usage.msgs", client.lindex("dramatiq:billing.usage", 0)))
    assert body["actor_name"] == "record_usage" and body["kwargs"]["idempotency_key"] == "batch-0"
    client.close()
    producer.broker.close()


def test_a_key_reused_with_another_amount_is_a_conflict_and_changes_nothing(setup, services, db):
    setup(accounts=[{"account_id": "a1", "balance_micros": 10 * USD}])

    async def run() -> None:
        service = _service(services)
        try:
            await service.handle("record_usage", _usage("a1", USD, "k1"), Delivery("m1"))
            with pytest.raises(IdempotencyConflict):
                await service.handle("record_usage", _usage("a1", 2 * USD, "k1"), Delivery("m2"))
        finally:
            await service.engine.dispose()

    asyncio.run(run())
    assert _account(db, "a1")["balance_micros"] == 9 * USD
    assert db("SELECT error_type FROM failed_messages") == [{"error_type": "idempotency_conflict"}]


# ---------------------------------------------------------------------------- hot accounts


def test_events_arriving_together_for_a_hot_account_commit_in_one_lock_one_entry(setup, services, db, audit):
    setup(
        accounts=[
            {"account_id": "hot", "balance_micros": 100 * USD},
            {"account_id": "cold", "balance_micros": USD},
        ]
    )
    n = 200

    async def run() -> tuple[int, int, list[dict[str, Any]]]:
        service = _service(services, max_batch=64)
        try:
            results = await asyncio.gather(
                *(
                    service.handle(
                        "record_usage",
                        _usage("hot" if i % 10 else "cold", 100_000, f"hot-{i}", meter="llm.tokens"),
                        Delivery(f"m{i}"),
                    )
                    for i in range(n)
                )
            )
            group = service.group_commits["record_usage"]
            return group.batches, group.largest_batch, list(results)
        finally:
            await service.engine.dispose()

    batches, largest, results = asyncio.run(run())
    assert all(r["outcome"] == "usage_recorded" for r in results)
    assert batches < n / 4 and largest > 10  # grouped
    entries = db(
        "SELECT count(*) AS n, -sum(amount_micros) AS total FROM ledger_entries WHERE kind = 'usage_charge'"
    )
    assert entries[0]["n"] <= batches * 2 < n  # one entry per account per batch, not one per event
    assert entries[0]["total"] == n * 100_000 - db("SELECT sum(owed_micros) AS o FROM accounts")[0]["o"]
    # cold: 20 events of 0.1 on 1 USD: 10 charged, the rest owed
    assert _account(db, "cold") == {"balance_micros": 0, "owed_micros": USD, "has_credits": False}
    assert _account(db, "hot") == {
        "balance_micros": 100 * USD - 180 * 100_000,
        "owed_micros": 0,
        "has_credits": True,
    }
    # each event is its own row, found by its key
    assert db("SELECT count(*) AS n FROM usage_events") == [{"n": n}]
    assert db("SELECT count(*) AS n FROM idempotency_keys WHERE status = 'completed'") == [{"n": n}]
    assert audit(quiescent=True) == {}


def test_a_batch_takes_its_keys_in_key_order_before_any_account_so_a_claim_cannot_deadlock_it(
    setup, services, db
):
    """A claim statement locks keys in key order; the batch must hold none of its keys while it waits for one.

    Account "a1" sorts first but its event's key ("k9") sorts last.  A
    transaction standing for another worker's claim holds "k1" (account
    "a2"'s event); the batch waits for it.  Locking account by account, the
    batch would hold "k9" meanwhile, and the claim's next key, "k9", would
    close the cycle: a deadlock, in which PostgreSQL rolls back the claim or
    the batch's account (checked both ways against version 1 of the function).
    """
    from datetime import UTC, datetime, timedelta

    from db import money
    from db.engine import transaction
    from db.money import BillingPolicy
    from db.money import record_usage as kind
    from tasks.messages import RecordUsageMessage

    setup(accounts=[{"account_id": a, "balance_micros": 10 * USD} for a in ("a1", "a2")])
    events = [
        RecordUsageMessage(account_id="a1", amount_micros=USD, idempotency_key="k9"),
        RecordUsageMessage(account_id="a2", amount_micros=USD, idempotency_key="k1"),
    ]

    async def run() -> tuple[bool, dict[str, Any]]:
        service = _service(services)
        now = datetime.now(UTC)
        try:
            async with service.autocommit.connect() as conn:
                await money.claim_keys(
                    conn,
                    [
                        money.KeyClaim(
                            e.idempotency_key, "record_usage", e.fingerprint(), e.account_id, "m", None
                        )
                        for e in events
                    ],
                    lease_expires_at=now + timedelta(minutes=5),
                )
            async with service.engine.connect() as claim:
                await claim.execute(text("BEGIN"))
                await claim.execute(text("SELECT 1 FROM idempotency_keys WHERE key = 'k1' FOR UPDATE"))

                async def batch() -> dict[str, Any]:
                    async with transaction(service.engine) as conn:
                        results, _ = await kind.record_usage_batch(conn, events, now, BillingPolicy())
                        return results

                running = asyncio.ensure_future(batch())
                await asyncio.sleep(0.5)  # the batch is waiting for k1
                assert not running.done()
                await claim.execute(text("SET LOCAL lock_timeout = '2s'"))
                try:
                    await claim.execute(text("SELECT 1 FROM idempotency_keys WHERE key = 'k9' FOR UPDATE"))
                    free = True
                except Exception:  # noqa: BLE001 - the batch held k9: lock timeout (or deadlock)
                    free = False
                await claim.execute(text("ROLLBACK"))
                return free, await running
        finally:
            await service.engine.dispose()

    free, results = asyncio.run(run())
    assert free, "the batch held a key while it waited for another"
    assert {k: r["outcome"] for k, r in results.items()} == {"k1": "usage_recorded", "k9": "usage_recorded"}
    assert db("SELECT count(*) AS n FROM usage_events") == [{"n": 2}]


def test_two_workers_on_one_hot_account_with_repeated_events_debit_each_event_once(
    setup, services, db, audit
):
    setup(accounts=[{"account_id": "hot", "balance_micros": 5 * USD}])
    keys = [f"e{i}" for i in range(120)]

    async def run() -> None:
        a, b = _service(services), _service(services)  # two processes' services: two pools, real concurrency
        try:
            # every event delivered to both workers (a redelivery race), some twice to one
            calls = [
                s.handle("record_usage", _usage("hot", 50_000, k), Delivery(f"{s is a}-{k}"))
                for k in keys
                for s in (a, b)
            ]
            calls += [
                a.handle("record_usage", _usage("hot", 50_000, k), Delivery(f"again-{k}")) for k in keys[::5]
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert not [r for r in results if isinstance(r, BaseException)], results
        finally:
            await a.engine.dispose()
            await b.engine.dispose()

    asyncio.run(run())
    assert db("SELECT count(*) AS n, sum(amount_micros) AS total FROM usage_events") == [
        {"n": 120, "total": 120 * 50_000}
    ]
    assert _account(db, "hot") == {"balance_micros": 0, "owed_micros": 1 * USD, "has_credits": False}
    assert audit(quiescent=True) == {}


def test_a_bad_event_in_a_batch_loses_and_doubles_none_of_the_others(setup, services, db):
    setup(accounts=[{"account_id": "a1", "balance_micros": 10 * USD}])

    async def run() -> list[Any]:
        service = _service(services)
        try:
            return await asyncio.gather(
                *(
                    service.handle("record_usage", _usage("a1", USD, f"g{i}"), Delivery(f"g{i}"))
                    for i in range(5)
                ),
                service.handle("record_usage", _usage("nobody", USD, "bad"), Delivery("bad")),
                return_exceptions=True,
            )
        finally:
            await service.engine.dispose()

    results = asyncio.run(run())
    assert [type(r).__name__ for r in results] == ["dict"] * 5 + ["UnknownAccount"]
    assert isinstance(results[-1], UnknownAccount)
    assert _account(db, "a1")["balance_micros"] == 5 * USD
    assert db("SELECT idempotency_key, error_type FROM failed_messages") == [
        {"idempotency_key": "bad", "error_type": "unknown_account"}
    ]


def test_an_error_applying_a_batch_sends_each_event_alone_so_only_the_failing_one_fails(setup, services, db):
    """The batch applies all its accounts in one subtransaction; an error there must not cost the others.

    A trigger stands for an error in one event (a constraint, a deadlock):
    it fails the insert of event "boom"'s row.  The batch's subtransaction
    rolls back and its events take the Python path one by one: the four
    others are applied once each, "boom" fails by itself, and nothing of it
    is written.
    """
    setup(accounts=[{"account_id": a, "balance_micros": 10 * USD} for a in ("a1", "a2")])
    db(
        "CREATE FUNCTION test_fail_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.idempotency_key = 'boom' THEN RAISE EXCEPTION 'boom refused'; END IF; RETURN NEW; END $$"
    )
    db(
        "CREATE TRIGGER test_fail_boom BEFORE INSERT ON usage_events FOR EACH ROW EXECUTE FUNCTION test_fail_boom()"
    )
    events = [("a1", "g1"), ("a2", "g2"), ("a1", "boom"), ("a2", "g3"), ("a1", "g4")]

    async def run() -> tuple[list[Any], dict[str, int]]:
        service = _service(services)
        try:
            results = await asyncio.gather(
                *(service.handle("record_usage", _usage(a, USD, k), Delivery(k)) for a, k in events),
                return_exceptions=True,
            )
            return list(results), dict(service.group_commits["record_usage"].fallbacks)
        finally:
            await service.engine.dispose()

    try:
        results, fallbacks = asyncio.run(run())
    finally:
        db("DROP TRIGGER test_fail_boom ON usage_events")
        db("DROP FUNCTION test_fail_boom()")
    outcomes = {
        k: r if isinstance(r, BaseException) else r["outcome"]
        for (_, k), r in zip(events, results, strict=True)
    }
    assert isinstance(outcomes.pop("boom"), Exception)
    assert outcomes == dict.fromkeys(("g1", "g2", "g3", "g4"), "usage_recorded")
    assert fallbacks.get("error", 0) >= 1  # the batch met the error and handed its events to the Python path
    assert db("SELECT idempotency_key FROM usage_events ORDER BY 1") == [
        {"idempotency_key": k} for k in ("g1", "g2", "g3", "g4")
    ]
    assert _account(db, "a1")["balance_micros"] == 8 * USD
    assert _account(db, "a2")["balance_micros"] == 8 * USD


@pytest.mark.parametrize("step", ["fast_after_claim", "fast_before_commit", "fast_after_apply"])
def test_a_crash_between_claim_and_commit_or_after_it_applies_each_event_once_on_redelivery(
    setup, services, db, audit, step
):
    setup(accounts=[{"account_id": "a1", "balance_micros": 3 * USD}])
    events = [_usage("a1", USD, f"c{i}") for i in range(5)]

    async def run() -> None:
        crashing = _service(services, crashpoints={step: "c"})
        try:
            results = await asyncio.gather(
                *(crashing.handle("record_usage", e, Delivery(e["idempotency_key"])) for e in events),
                return_exceptions=True,
            )
            assert all(isinstance(r, SimulatedCrash) for r in results), results
            assert crashing.group_commits["record_usage"].batches >= 1  # the fast path died
        finally:
            await crashing.engine.dispose()
        applied = await _q(crashing, "SELECT count(*) AS n FROM usage_events")
        assert applied == [{"n": 5 if step == "fast_after_apply" else 0}]
        service = _service(services)
        try:
            again = await asyncio.gather(
                *(
                    service.handle("record_usage", e, Delivery(e["idempotency_key"], retries=1))
                    for e in events
                )
            )
            assert all(r["outcome"] == "usage_recorded" for r in again)
            assert all(r.get("duplicate") for r in again) == (step == "fast_after_apply")
        finally:
            await service.engine.dispose()

    asyncio.run(run())
    assert _account(db, "a1") == {"balance_micros": 0, "owed_micros": 2 * USD, "has_credits": False}
    assert db("SELECT count(*) AS n FROM usage_events") == [{"n": 5}]
    # each delivery counted once; a redelivery of a completed key is not counted
    attempts = 1 if step == "fast_after_apply" else 2
    assert db("SELECT attempts FROM idempotency_keys ORDER BY key") == [{"attempts": attempts}] * 5
    assert audit(quiescent=True) == {}


# ---------------------------------------------------------------------------- auto-top-up


def test_usage_that_takes_the_balance_under_the_threshold_tops_up_and_the_top_up_collects_owed_first(
    setup, producer, drain, db, audit
):
    setup(
        accounts=[
            {
                "account_id": "a1",
                "balance_micros": 5 * USD,
                "auto_top_up_threshold_micros": 2 * USD,
                "auto_top_up_amount_micros": 20 * USD,
                "payment_method_ref": "pm_card_visa",
            }
        ]
    )
    producer.record_usage(account_id="a1", amount_micros=8 * USD, idempotency_key="big-1")
    drain()
    # 5 charged, 3 owed; the top-up of 20 collected the 3 first
    assert db("SELECT status, amount_micros FROM top_up_attempts") == [
        {"status": "succeeded", "amount_micros": 20 * USD}
    ]
    assert _account(db, "a1") == {"balance_micros": 17 * USD, "owed_micros": 0, "has_credits": True}
    assert audit(quiescent=True) == {}


def test_an_account_allows_several_top_ups_a_month_up_to_its_own_limit(setup, producer, drain, db):
    setup(
        accounts=[
            {
                "account_id": "a1",
                "balance_micros": 3 * USD,
                "auto_top_up_threshold_micros": 2 * USD,
                "auto_top_up_amount_micros": 5 * USD,
                "payment_method_ref": "pm_card_visa",
            }
        ]
    )

    cli("account", "auto-top-up", "a1", "--max-per-month", "3")
    for i in range(6):  # each event takes the balance under the threshold again
        producer.record_usage(account_id="a1", amount_micros=4 * USD, idempotency_key=f"u{i}")
        drain()
    assert db("SELECT count(*) AS n FROM top_up_attempts WHERE status = 'succeeded'") == [{"n": 3}]
    # 3 + 15 topped up, 24 used: 6 owed, and no fourth top-up this month
    assert _account(db, "a1") == {"balance_micros": 0, "owed_micros": 6 * USD, "has_credits": False}


# ---------------------------------------------------------------------------- the audit, both ways


@pytest.mark.parametrize(
    ("check", "corrupt"),
    [
        (
            "usage_charged_or_owed",
            "UPDATE usage_events SET amount_micros = amount_micros + 1,"
            " owed_micros = owed_micros + 1 WHERE idempotency_key = 'ok-1'",
        ),
        ("owed_usage_collected", "UPDATE accounts SET owed_micros = 5 WHERE id = 'a1'"),
        ("usage_applied_once", "DELETE FROM usage_events WHERE idempotency_key = 'ok-2'"),
        ("has_credits_matches_account", "UPDATE account_entitlements SET has_credits = NOT has_credits"),
    ],
)
def test_each_usage_audit_check_passes_when_healthy_and_fails_on_its_corruption(
    setup, producer, drain, db, audit, check, corrupt
):
    setup(accounts=[{"account_id": "a1", "balance_micros": 10 * USD}])
    producer.record_usage_many([_usage("a1", USD, "ok-1"), _usage("a1", 2 * USD, "ok-2")])
    drain()
    assert audit(quiescent=True) == {}
    db(corrupt)
    flagged = audit(quiescent=False)
    assert check in flagged, flagged
    assert {r.get("account_id", "a1") for r in flagged[check]} == {"a1"}


def test_a_usage_event_written_with_redis_cli_as_documented_is_applied(setup, services, drain, db, audit):
    """The redis-cli block of docs/contract.md, run as it stands (what a producer in another language writes)."""
    import re
    import shutil

    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    doc = (ROOT / "docs" / "contract.md").read_text()
    section = doc[doc.index("A usage event goes to its own queue") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None and "billing.usage" in block[1]
    setup(accounts=[{"account_id": "acct_1", "balance_micros": 10 * USD}])
    done = subprocess.run(
        ["bash", "-c", block[1]],
        env={**os.environ, "BILLING_REDIS_URL": services.redis_url},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and "ERR" not in done.stdout, done.stdout + done.stderr
    drain()
    assert db("SELECT idempotency_key, amount_micros, meter, quantity FROM usage_events") == [
        {"idempotency_key": "evt_01JX4Q", "amount_micros": 1250, "meter": "llm.tokens", "quantity": 412}
    ]
    assert _account(db, "acct_1")["balance_micros"] == 10 * USD - 1250
    assert audit(quiescent=True) == {}
