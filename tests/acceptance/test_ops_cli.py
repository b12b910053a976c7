"""``billing ops``: find a failed message, inspect it, retry it, as an operator does from a shell."""

from __future__ import annotations

import json
from typing import Any

import redis

from tests.acceptance.test_cli import billing

USD = 1_000_000
OPERATOR = {"BILLING_OPERATOR": "alice@ops"}


def _dead_lettered(services, queue="billing"):
    client = redis.Redis.from_url(services.redis_url)
    try:
        return int(client.zcard(f"dramatiq:{queue}.XQ"))
    finally:
        client.close()


def _fail_a_subscribe(setup, producer, drain, key="s1"):
    """A subscribe for an account that does not exist yet: a permanent failure, dead-lettered."""
    setup(plans=[{"plan_id": "pro", "price_micros": 10 * USD}])
    producer.subscribe(account_id="late", plan_id="pro", idempotency_key=key)
    drain()


def test_find_inspect_and_retry_a_failed_message(services, db, setup, producer, drain):
    _fail_a_subscribe(setup, producer, drain)
    assert _dead_lettered(services) == 1

    out = billing("ops", "failures", "--json", "--actor", "subscribe", "--error", "unknown_account")
    assert out.returncode == 0, out.stderr
    (failure,) = json.loads(out.stdout)
    assert (failure["error_type"], failure["status"], failure["key_status"]) == (
        "unknown_account",
        "dead",
        "failed",
    )
    message_id = failure["message_id"]

    shown = json.loads(billing("ops", "show", message_id, "--json").stdout)
    assert shown["failure"]["kwargs"] == {"account_id": "late", "plan_id": "pro", "idempotency_key": "s1"}
    assert "UnknownAccount" in shown["failure"]["traceback"]
    assert shown["idempotency_key"]["status"] == "failed"

    queues = json.loads(billing("ops", "queues", "--json").stdout)
    assert {q["queue"]: q["dead"] for q in queues["queues"]} == {
        "billing": 1,
        "billing.payments": 0,
        "billing.usage": 0,
    }
    assert any(w["alive"] for w in queues["workers"])

    # the cause is fixed (the account now exists); the retry applies the message once
    setup(accounts=[{"account_id": "late", "balance_micros": 30 * USD}])
    out = billing("ops", "retry", message_id, env=OPERATOR)
    assert out.returncode == 0 and "retried 1, skipped 0" in out.stdout, out.stdout + out.stderr
    drain()
    assert db("SELECT status FROM idempotency_keys WHERE key = 's1'") == [{"status": "completed"}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 20 * USD}]
    assert db("SELECT status, retry_count, last_retried_by FROM failed_messages") == [
        {"status": "retried", "retry_count": 1, "last_retried_by": "alice@ops"}
    ]
    assert _dead_lettered(services) == 0  # taken out of Dramatiq's dead-letter queue
    # retrying again is harmless: the key is completed, the message a duplicate
    assert billing("ops", "retry", message_id, env=OPERATOR).returncode == 0
    drain()
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'") == [{"n": 1}]

    actions = json.loads(billing("ops", "actions", "--json").stdout)
    assert [(a["operator"], a["via"], a["action"], a["count"]) for a in actions] == [
        ("alice@ops", "cli", "retry", 1),
        ("alice@ops", "cli", "retry", 1),
    ]
    key = json.loads(billing("ops", "key", "s1", "--json").stdout)
    assert key["result"]["outcome"] == "subscribed"
    timeline = json.loads(billing("ops", "account", "late", "--json").stdout)
    events = [(e["source"], e["event"]) for e in timeline]
    assert ("ledger", "subscription_charge") in events and ("api_key", "issued") in events
    assert "key_hash" not in out.stdout + json.dumps(timeline)


def test_a_poison_key_gets_a_fresh_delivery_budget_when_an_operator_retries_it(
    services, db, setup, producer, drain
):
    _fail_a_subscribe(setup, producer, drain)
    # as if it had killed its worker max_deliveries times
    db("UPDATE idempotency_keys SET status = 'dead', attempts = 11")
    setup(accounts=[{"account_id": "late", "balance_micros": 30 * USD}])
    message_id = db("SELECT message_id FROM failed_messages")[0]["message_id"]
    assert billing("ops", "retry", message_id).returncode == 0
    drain()
    assert db("SELECT status, attempts FROM idempotency_keys") == [{"status": "completed", "attempts": 1}]


def test_retry_all_with_filters_dry_run_then_for_real_skipping_conflicts(
    services, db, setup, producer, drain
):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="late1", plan_id="pro", idempotency_key="s1")
    producer.subscribe(account_id="late2", plan_id="pro", idempotency_key="s2")
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="c1")
    drain()  # c1 is applied first; then the same key comes with other arguments: a conflict
    producer.subscribe(account_id="a1", plan_id="other", idempotency_key="c1")
    drain()
    assert db("SELECT count(*) AS n FROM failed_messages") == [{"n": 3}]

    dry = json.loads(billing("ops", "retry", "--all", "--actor", "subscribe", "--dry-run", "--json").stdout)
    assert dry["dry_run"] is True and len(dry["retried"]) == 2 and len(dry["skipped"]) == 1
    assert "other arguments" in next(iter(dry["skipped"].values()))
    assert db("SELECT count(*) AS n FROM operator_actions") == [{"n": 0}]  # a dry run changes nothing

    setup(
        accounts=[
            {"account_id": "late1", "balance_micros": 20 * USD},
            {"account_id": "late2", "balance_micros": 20 * USD},
        ]
    )
    out = billing("ops", "retry", "--all", "--since", "1h", "--json", env=OPERATOR)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["retried"]) == 2
    drain()
    outcomes = db("SELECT key, status FROM idempotency_keys WHERE key IN ('s1', 's2') ORDER BY key")
    assert outcomes == [{"key": "s1", "status": "completed"}, {"key": "s2", "status": "completed"}]
    (action,) = db("SELECT action, count, target FROM operator_actions")
    assert (action["action"], action["count"]) == ("retry_all", 2)
    # bad usage: filters without --all, nothing to retry
    assert billing("ops", "retry", "m1", "--actor", "renew").returncode == 2
    assert billing("ops", "retry").returncode == 2


def test_replay_under_a_new_key_asks_first_and_is_audited(services, db, setup, producer, drain):
    _fail_a_subscribe(setup, producer, drain)
    setup(accounts=[{"account_id": "late", "balance_micros": 30 * USD}])
    message_id = db("SELECT message_id FROM failed_messages")[0]["message_id"]
    refused = billing(
        "ops", "replay", message_id, "--new-key", "s1-replay"
    )  # stdin is empty: no confirmation
    assert refused.returncode == 1 and "aborted" in refused.stderr
    assert db("SELECT count(*) AS n FROM operator_actions") == [{"n": 0}]
    out = billing("ops", "replay", message_id, "--new-key", "s1-replay", "--yes", env=OPERATOR)
    assert out.returncode == 0, out.stderr
    drain()
    assert db("SELECT status FROM idempotency_keys WHERE key = 's1-replay'") == [{"status": "completed"}]
    assert db("SELECT status, resolved_by FROM failed_messages") == [
        {"status": "resolved", "resolved_by": "alice@ops"}
    ]
    assert db("SELECT action FROM operator_actions") == [{"action": "replay"}]


def test_purge_dead_asks_unless_yes_and_keeps_the_postgres_record(services, db, setup, producer, drain):
    _fail_a_subscribe(setup, producer, drain)
    assert _dead_lettered(services) == 1
    assert billing("ops", "purge-dead", "--older-than", "1h", "--yes").stdout.strip() == (
        "purged 0 from billing, purged 0 from billing.payments, purged 0 from billing.usage"
    )
    assert billing("ops", "purge-dead", "--older-than", "0s").returncode == 1  # no confirmation on stdin
    assert _dead_lettered(services) == 1
    out = billing("ops", "purge-dead", "--older-than", "0s", "--yes", "--json", env=OPERATOR)
    assert json.loads(out.stdout) == {
        "dry_run": False,
        "purged": {"billing": 1, "billing.payments": 0, "billing.usage": 0},
    }
    assert _dead_lettered(services) == 0
    assert db("SELECT status FROM failed_messages") == [{"status": "dead"}]
    assert billing("ops", "purge-dead", "--older-than", "soon").returncode == 2


def test_secret_looking_arguments_are_stored_redacted(services, db, producer, drain, broker):
    import dramatiq

    broker.enqueue(
        dramatiq.Message(
            queue_name="billing",
            actor_name="subscribe",
            args=(),
            kwargs={"account_id": "a1", "plan_id": "p", "idempotency_key": "k", "api_key": "bq_live_secret"},
            options={},
        )
    )
    drain()
    (row,) = db("SELECT kwargs::text AS kwargs, error_type FROM failed_messages")
    assert row["error_type"] == "message_validation_error"
    assert "bq_live_secret" not in row["kwargs"] and "[redacted]" in row["kwargs"]


def test_a_top_up_stuck_pending_after_its_retries_is_finished_by_an_operator_retry(
    services, db, setup, producer, drain
):
    """A provider outage outlasts the retries; once it is over, ``ops retry`` continues the same attempt."""
    from workers import actors

    account = billing(
        "account", "create", "a1", "--currency", "USD", "--auto-top-up-threshold-micros", str(1 * USD),
        "--auto-top-up-amount-micros", str(10 * USD), "--payment-method", "pm_card_ok",
    )  # fmt: skip
    assert account.returncode == 0, account.stderr
    provider = actors.get_service().provider
    assert provider.error_rate == 0  # type: ignore[attr-defined]
    provider.error_rate = 1.0  # type: ignore[attr-defined]  # the provider is down: every call fails before charging
    try:
        producer.auto_top_up(account_id="a1", idempotency_key="t1", reason="low_balance")
        drain()
    finally:
        provider.error_rate = 0.0  # type: ignore[attr-defined]  # the outage ends
    # retries ran out: the attempt is pending, its failure visible to operators, nothing charged
    assert db("SELECT status FROM top_up_attempts") == [{"status": "pending"}]
    assert db("SELECT * FROM fake_provider_charges") == []
    (failure,) = db("SELECT message_id, error_type, status FROM failed_messages")
    assert (failure["error_type"], failure["status"]) == ("provider_error", "dead")
    assert billing("ops", "retry", failure["message_id"]).returncode == 0
    drain()
    assert db("SELECT status FROM top_up_attempts") == [{"status": "succeeded"}]
    # the same attempt, under the same provider key: one charge, credited once
    (attempt,) = db("SELECT provider_idempotency_key FROM top_up_attempts")
    assert db("SELECT idempotency_key, amount_micros FROM fake_provider_charges") == [
        {"idempotency_key": attempt["provider_idempotency_key"], "amount_micros": 10 * USD}
    ]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'top_up'") == [{"n": 1}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 10 * USD}]
    assert billing("audit", "--drained").returncode == 0


def test_a_broken_card_is_replaced_with_the_cli_and_the_replayed_top_up_charges_the_new_one(
    services, db, setup, producer, drain, clock, broker
):
    """No SQL: the operator changes the payment method with ``billing account auto-top-up``.

    A retry continues the stuck attempt, which is bound to the card it was sent
    with (its provider key names one request), so the new card cannot finish
    it.  The reconciler settles it as failed once the provider shows no charge
    under its key; the month's top-up slot is used (every attempt counts), so
    the replay under a new key in the next month charges the new card, once.
    """
    import asyncio
    from datetime import timedelta

    from db.audit import run_audit
    from db.engine import make_engine
    from workers import actors
    from workers.providers import FakePaymentProvider
    from workers.scheduler import Scheduler

    async def scheduler_pass() -> Any:
        """One ``billing scheduler`` pass on the test's clock (its reconciler asks the fake provider)."""
        engine = make_engine(services.database_url, pool_size=1)
        try:
            # the worker's provider is bound to the worker's event loop: the same fake, on this loop
            provider = FakePaymentProvider(engine, clock=clock)
            policy = actors.get_service().policy
            return await Scheduler(engine, broker, clock=clock, policy=policy, provider=provider).run_pass()
        finally:
            await engine.dispose()

    async def audit() -> Any:
        engine = make_engine(services.database_url, pool_size=1)
        try:
            return await run_audit(engine, quiescent=True, now=clock.now())
        finally:
            await engine.dispose()

    account = billing(
        "account", "create", "a1", "--currency", "USD", "--auto-top-up-threshold-micros", str(1 * USD),
        "--auto-top-up-amount-micros", str(10 * USD), "--payment-method", "pm_error_broken",
    )  # fmt: skip
    assert account.returncode == 0, account.stderr
    producer.auto_top_up(account_id="a1", idempotency_key="t1", reason="low_balance")
    drain()
    (failure,) = db("SELECT message_id, error_type, status FROM failed_messages")
    assert (failure["error_type"], failure["status"]) == ("provider_error", "dead")
    assert db("SELECT status, payment_method_ref FROM top_up_attempts") == [
        {"status": "pending", "payment_method_ref": "pm_error_broken"}
    ]

    switched = billing("account", "auto-top-up", "a1", "--payment-method", "pm_card_ok")
    assert switched.returncode == 0, switched.stderr
    assert db("SELECT payment_method_ref FROM accounts") == [{"payment_method_ref": "pm_card_ok"}]
    # past the attempt's deadline (and into the next month), the reconciler settles it
    clock.advance(timedelta(hours=13))
    report = asyncio.run(scheduler_pass())
    assert report.reconciler is not None and report.reconciler.settled == {"failed": 1}, report
    assert db("SELECT status FROM top_up_attempts") == [{"status": "failed"}]

    out = billing("ops", "replay", failure["message_id"], "--new-key", "t2", "--yes", env=OPERATOR)
    assert out.returncode == 0, out.stdout + out.stderr
    drain()
    assert db(
        "SELECT message_idempotency_key AS key, payment_method_ref, status FROM top_up_attempts ORDER BY created_at"
    ) == [
        {"key": "t1", "payment_method_ref": "pm_error_broken", "status": "failed"},
        {"key": "t2", "payment_method_ref": "pm_card_ok", "status": "succeeded"},
    ]
    assert db("SELECT payment_method_ref, amount_micros FROM fake_provider_charges") == [
        {"payment_method_ref": "pm_card_ok", "amount_micros": 10 * USD}
    ]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'top_up'") == [{"n": 1}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 10 * USD}]
    audited = asyncio.run(audit())
    assert audited.ok, {k: v for k, v in audited.violations.items() if v}


def test_a_message_for_an_unknown_actor_is_recorded_for_operators(services, db, drain, broker):
    import dramatiq

    message = broker.enqueue(
        dramatiq.Message(
            queue_name="billing",
            actor_name="charge_everyone",
            args=(),
            kwargs={"amount_micros": 1},
            options={},
        )
    )
    drain()
    assert _dead_lettered(services) == 1  # Dramatiq's own dead-letter queue
    out = json.loads(billing("ops", "failures", "--json").stdout)
    assert [(f["message_id"], f["actor_name"], f["error_type"]) for f in out] == [
        (message.message_id, "charge_everyone", "message_validation_error")
    ]
    assert "unknown actor" in db("SELECT error_message FROM failed_messages")[0]["error_message"]


def _one_error_line(result, code):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("billing: error: "), result.stderr
    return lines[0]


def test_a_failure_is_replayed_once_and_a_second_replay_is_refused(services, db, setup, producer, drain):
    _fail_a_subscribe(setup, producer, drain)
    setup(accounts=[{"account_id": "late", "balance_micros": 30 * USD}])
    message_id = db("SELECT message_id FROM failed_messages")[0]["message_id"]
    first = billing("ops", "replay", message_id, "--new-key", "k2", "--yes", env=OPERATOR)
    assert first.returncode == 0, first.stderr
    drain()
    second = billing("ops", "replay", message_id, "--new-key", "k3", "--yes")
    line = _one_error_line(second, 2)
    assert "already replayed" in line and "k2" in line and "alice@ops" in line, line
    drain()
    assert db("SELECT key FROM idempotency_keys WHERE key IN ('k2', 'k3')") == [{"key": "k2"}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'") == [{"n": 1}]
    assert db("SELECT action FROM operator_actions") == [{"action": "replay"}]
    assert db("SELECT replayed_by, replay_key FROM failed_messages") == [
        {"replayed_by": "alice@ops", "replay_key": "k2"}
    ]
    shown = json.loads(billing("ops", "show", message_id, "--json").stdout)
    assert shown["failure"]["replay_key"] == "k2"


def test_two_concurrent_replays_of_one_failure_enqueue_one_message(services, db, setup, producer, drain):
    """Two real ``billing ops replay`` processes race on one failure: one wins, the other is refused."""
    import asyncio
    import os
    import subprocess
    import sys
    import time

    import asyncpg

    from db.config import plain_url
    from tests.conftest import ROOT

    _fail_a_subscribe(setup, producer, drain)
    setup(accounts=[{"account_id": "late", "balance_micros": 30 * USD}])
    message_id = db("SELECT message_id FROM failed_messages")[0]["message_id"]

    async def race():
        holder = await asyncpg.connect(plain_url(services.database_url))
        # pg_stat_activity is read once per transaction: watch it from another connection
        watcher = await asyncpg.connect(plain_url(services.database_url))
        tx = holder.transaction()
        await tx.start()
        # hold the failure's row so that both replays reach their write before either commits
        await holder.execute("SELECT 1 FROM failed_messages WHERE message_id = $1 FOR UPDATE", message_id)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "ops", "replay", message_id, "--new-key", key, "--yes"],
                cwd=ROOT,
                env=os.environ.copy(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for key in ("k2", "k3")
        ]
        try:
            deadline = time.monotonic() + 60
            while True:
                waiting = await watcher.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
                if waiting >= 2:
                    break
                if time.monotonic() > deadline:
                    for p in procs:
                        p.kill()
                    raise AssertionError([p.communicate() for p in procs])
                assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
                await asyncio.sleep(0.05)
        finally:
            await tx.rollback()
            await holder.close()
            await watcher.close()
        return [(p.wait(timeout=60), *p.communicate()) for p in procs]

    results = asyncio.run(race())
    assert sorted(code for code, _, _ in results) == [0, 2], results
    (loser,) = [r for r in results if r[0] == 2]
    lines = loser[2].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("billing: error: ") and "already replayed" in lines[0]
    drain()
    assert db("SELECT count(*) AS n FROM idempotency_keys WHERE key IN ('k2', 'k3')") == [{"n": 1}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'") == [{"n": 1}]
    assert db("SELECT count(*) AS n FROM operator_actions WHERE action = 'replay'") == [{"n": 1}]


def test_a_replay_whose_relay_fails_is_committed_and_sent_by_the_outbox_sweeper(
    services, db, setup, producer, drain
):
    """The replay's new message is written to the outbox with the replay record: Redis failing
    after the commit loses nothing, and the replay is not open to a second one meanwhile."""
    import asyncio
    import time

    from db.engine import make_engine
    from tasks.errors import AlreadyReplayed
    from workers import actors
    from workers.operators.actions import replay_with_new_key

    _fail_a_subscribe(setup, producer, drain)
    setup(accounts=[{"account_id": "late", "balance_micros": 30 * USD}])
    message_id = db("SELECT message_id FROM failed_messages")[0]["message_id"]

    class DownBroker:
        def enqueue(self, message: Any, *, delay: Any = None) -> Any:
            raise redis.ConnectionError("Redis is down")

    async def replay(key: str, broker: Any) -> str:
        engine = make_engine(services.database_url, pool_size=1)
        try:
            return await replay_with_new_key(engine, broker, message_id, new_key=key, operator="t", via="cli")
        finally:
            await engine.dispose()

    new_id = asyncio.run(replay("k2", DownBroker()))
    assert db("SELECT replay_key, replay_message_id FROM failed_messages") == [
        {"replay_key": "k2", "replay_message_id": new_id}
    ]
    try:
        asyncio.run(replay("k3", actors.broker))
        raise AssertionError("a second replay was accepted")
    except AlreadyReplayed:
        pass
    # the session worker's outbox sweeper (500 ms) sends it
    deadline = time.monotonic() + 30
    while db("SELECT status FROM idempotency_keys WHERE key = 'k2'") != [{"status": "completed"}]:
        assert time.monotonic() < deadline, db("SELECT * FROM outbox")
        time.sleep(0.2)
        drain()
    assert db("SELECT count(*) AS n FROM outbox") == [{"n": 0}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'") == [{"n": 1}]
    assert db("SELECT key FROM idempotency_keys WHERE key IN ('k2', 'k3')") == [{"key": "k2"}]
