"""Message authentication: unsigned, forged, tampered or replayed-under-another-actor messages are never applied."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tasks.errors import ConfigurationError, MessageAuthenticationFailed
from tasks.signing import SIGNATURE_OPTION, SigningKeys, canonical_form, signing_keys_from_env
from workers.billing import BillingService, Delivery

USD = 1_000_000
OLD, NEW = "k2026a-" + "o" * 32, "k2026b-" + "n" * 32
KEYS = SigningKeys(secrets={"k1": OLD, "k2": NEW}, signing_key_id="k2")
KWARGS = {"account_id": "a1", "plan_id": "pro", "idempotency_key": "s1"}


def test_canonical_form_is_sorted_compact_utf8_json():
    assert (
        canonical_form("subscribe", "m1", {"b": 1, "a": "é"}) == '["subscribe","m1",{"a":"é","b":1}]'.encode()
    )


def test_a_signature_verifies_only_the_message_it_signed():
    sig = KEYS.sign("subscribe", "m1", KWARGS)
    assert sig.startswith("v1:k2:") and len(sig) == len("v1:k2:") + 64
    assert KEYS.verify("subscribe", "m1", KWARGS, sig) is None
    assert "does not match" in KEYS.verify("subscribe", "m1", {**KWARGS, "plan_id": "team"}, sig)  # tampered
    assert "does not match" in KEYS.verify("renew", "m1", KWARGS, sig)  # replayed under another actor
    assert "does not match" in KEYS.verify("subscribe", "m2", KWARGS, sig)  # under another message id
    forged = SigningKeys(secrets={"k2": "x" * 40}, signing_key_id="k2").sign("subscribe", "m1", KWARGS)
    assert "does not match" in KEYS.verify("subscribe", "m1", KWARGS, forged)
    assert KEYS.verify("subscribe", "m1", KWARGS, None) == "the message is not signed"
    assert "malformed" in KEYS.verify("subscribe", "m1", KWARGS, "nonsense")
    assert "unknown signing key" in KEYS.verify("subscribe", "m1", KWARGS, "v1:k9:" + "0" * 64)
    assert "unknown signature version" in KEYS.verify("subscribe", "m1", KWARGS, "v0:k2:" + "0" * 64)


def test_rotation_the_old_key_still_verifies_while_the_new_one_signs():
    old_producer = SigningKeys(secrets={"k1": OLD}, signing_key_id="k1")
    assert KEYS.verify("subscribe", "m1", KWARGS, old_producer.sign("subscribe", "m1", KWARGS)) is None
    retired = SigningKeys(secrets={"k2": NEW}, signing_key_id="k2")
    assert "unknown signing key" in retired.verify(
        "subscribe", "m1", KWARGS, old_producer.sign("subscribe", "m1", KWARGS)
    )


def test_keys_from_the_environment_are_checked():
    assert signing_keys_from_env({}) is None
    keys = signing_keys_from_env({"BILLING_SIGNING_KEYS": json.dumps({"k1": OLD})})
    assert keys is not None and keys.signing_key_id == "k1"
    for env in (
        {"BILLING_SIGNING_KEYS": "not json"},
        {"BILLING_SIGNING_KEYS": json.dumps({"k1": "short"})},
        {"BILLING_SIGNING_KEYS": json.dumps({"k1": OLD, "k2": NEW})},  # two keys, none named for signing
        {"BILLING_SIGNING_KEYS": json.dumps({"k1": OLD}), "BILLING_SIGNING_KEY_ID": "k9"},
    ):
        with pytest.raises(ConfigurationError):
            signing_keys_from_env(env)
    assert "n" * 32 not in repr(KEYS)  # secrets stay out of reprs (and so out of logs)


@pytest.mark.parametrize(
    "case",
    ["unsigned", "forged", "tampered", "another_actor", "another_message_id"],
)
def test_the_worker_records_and_never_applies_a_message_that_does_not_verify(setup, services, db, case):
    from db.engine import make_engine
    from workers.providers import FakePaymentProvider

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 30 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    good = KEYS.sign("subscribe", "m1", KWARGS)
    kwargs, actor, signature = dict(KWARGS), "subscribe", good
    if case == "unsigned":
        signature = None
    elif case == "forged":
        signature = SigningKeys(secrets={"k2": "f" * 40}, signing_key_id="k2").sign("subscribe", "m1", KWARGS)
    elif case == "tampered":
        kwargs["plan_id"] = "team"
    elif case == "another_actor":
        signature = KEYS.sign("renew", "m1", KWARGS)
    elif case == "another_message_id":
        signature = KEYS.sign("subscribe", "m0", KWARGS)

    async def run():
        engine = make_engine(services.database_url, pool_size=2)
        service = BillingService(engine=engine, provider=FakePaymentProvider(engine), signing_keys=KEYS)
        try:
            with pytest.raises(MessageAuthenticationFailed):
                await service.handle(actor, kwargs, Delivery("m1", signature=signature))
            # the genuine message still goes through
            return await service.handle("subscribe", KWARGS, Delivery("m1", signature=good))
        finally:
            await engine.dispose()

    assert asyncio.run(run())["outcome"] == "subscribed"
    (failure,) = db("SELECT error_type, idempotency_key FROM failed_messages")
    assert failure == {"error_type": "message_authentication_failed", "idempotency_key": None}
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'") == [{"n": 1}]


def test_signed_end_to_end_through_redis_with_follow_ups_and_a_raw_unsigned_message(
    setup, services, db, spawn_worker
):
    """A worker process with keys: signed producer messages and the worker's own follow-ups verify; raw ones don't."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    from tasks.producer import Producer

    setup(
        accounts=[
            {
                "account_id": "a1",
                "balance_micros": 5 * USD,
                "auto_top_up_threshold_micros": 1 * USD,
                "auto_top_up_amount_micros": 20 * USD,
                "payment_method_ref": "pm_card_ok",
            }
        ],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    env = {"BILLING_SIGNING_KEYS": json.dumps({"k1": OLD, "k2": NEW}), "BILLING_SIGNING_KEY_ID": "k2"}
    spawn_worker(**env)
    producer = Producer(broker=RedisBroker(url=services.redis_db(1)), signing_keys=KEYS)
    # short balance: the worker's own auto_top_up and resumed subscribe travel signed by the worker's broker
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s1")
    raw = RedisBroker(url=services.redis_db(1))
    unsigned = dramatiq.Message(
        queue_name="billing",
        actor_name="subscribe",
        args=(),
        kwargs={**KWARGS, "idempotency_key": "evil"},
        options={},
    )
    raw.enqueue(unsigned)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = db("SELECT status FROM idempotency_keys WHERE key = 's1'") == [{"status": "completed"}]
        if done and db("SELECT 1 FROM failed_messages WHERE message_id = $1", unsigned.message_id):
            break
        time.sleep(0.1)
    assert db("SELECT result->>'outcome' AS o FROM idempotency_keys WHERE key = 's1'") == [
        {"o": "subscribed"}
    ]
    assert db("SELECT status FROM top_up_attempts") == [{"status": "succeeded"}]
    assert db("SELECT error_type FROM failed_messages") == [{"error_type": "message_authentication_failed"}]
    assert db("SELECT 1 FROM idempotency_keys WHERE key = 'evil'") == []
    assert SIGNATURE_OPTION == "billing_signature"


# --------------------------------------------------------------------------- messages that move keep their signature

PRODUCER = SigningKeys(secrets={"k1": OLD}, signing_key_id="k1")  # a producer still on the old key
WORKER_ENV = {"BILLING_SIGNING_KEYS": json.dumps({"k1": OLD, "k2": NEW}), "BILLING_SIGNING_KEY_ID": "k2"}


def _raw(
    client, queue: str, actor: str, kwargs: dict, *, signature: str | None = None, eta: bool = False
) -> dict:
    """Write one Dramatiq message (its JSON format) straight into ``queue``, as anyone with Redis access can.

    ``queue`` ``X.XQ`` is a dead-letter queue (a sorted set); any other is a list
    with its ``.msgs`` hash.  ``eta`` gives the message an eta in the past
    (what a delay queue holds).  Returns the envelope.
    """
    import uuid

    from dramatiq.common import current_millis

    redis_id, message_id = str(uuid.uuid4()), str(uuid.uuid4())
    options: dict = {"redis_message_id": redis_id}
    if signature is not None:
        options[SIGNATURE_OPTION] = signature
    if eta:
        options["eta"] = current_millis() - 1000
    envelope = {
        "queue_name": queue.removesuffix(".XQ"),
        "actor_name": actor,
        "args": [],
        "kwargs": kwargs,
        "options": options,
        "message_id": message_id,
        "message_timestamp": current_millis(),
    }
    payload = json.dumps(envelope)
    if queue.endswith(".XQ"):
        client.zadd(f"dramatiq:{queue}", {redis_id: current_millis()})
        client.hset(f"dramatiq:{queue}.msgs", redis_id, payload)
    else:
        client.hset(f"dramatiq:{queue}.msgs", redis_id, payload)
        client.rpush(f"dramatiq:{queue}", redis_id)
    return envelope


@pytest.fixture
def signing_broker(services, monkeypatch):
    """A worker-side broker (``make_broker``) with signing keys, on Redis database 2, nobody consuming it."""
    import redis

    from workers.broker import make_broker
    from workers.settings import get_settings

    for name, value in WORKER_ENV.items():
        monkeypatch.setenv(name, value)
    from dramatiq.middleware import AsyncIO

    client = redis.Redis.from_url(services.redis_db(2))
    broker = make_broker(get_settings(), client=client)
    # its actors are sync: a Worker on it must not start or stop the process's
    # one AsyncIO event loop thread, which the session's worker runs on
    broker.middleware[:] = [m for m in broker.middleware if not isinstance(m, AsyncIO)]
    yield broker
    client.close()


def test_a_retried_or_delayed_message_keeps_its_own_signature_and_an_unsigned_one_stays_unsigned(
    signing_broker,
):
    """Dramatiq's own paths on a real Worker: the Retries middleware's re-enqueue and the DQ -> queue move."""
    import dramatiq
    from dramatiq.middleware import CurrentMessage

    from tasks.errors import DatabaseUnavailable

    broker = signing_broker
    seen: list[tuple[str, str | None, int]] = []

    def subscribe(**kwargs):
        message = CurrentMessage.get_current_message()
        retries = message.options.get("retries", 0)
        seen.append((message.message_id, message.options.get(SIGNATURE_OPTION), retries))
        if retries == 0:
            raise DatabaseUnavailable("PostgreSQL went away for a moment")

    dramatiq.actor(
        subscribe,
        broker=broker,
        actor_name="subscribe",
        queue_name="billing",
        max_retries=1,
        min_backoff=10,
        max_backoff=20,
    )
    client = broker.client
    signed_kwargs = {**KWARGS, "idempotency_key": "signed"}
    unsigned = _raw(client, "billing", "subscribe", {**KWARGS, "idempotency_key": "unsigned"})
    delayed = _raw(client, "billing.DQ", "subscribe", {**KWARGS, "idempotency_key": "delayed"}, eta=True)
    signed = _raw(client, "billing", "subscribe", signed_kwargs, signature="placeholder")
    # sign it for its own message id (what a producer does), then rewrite it in place
    signed["options"][SIGNATURE_OPTION] = PRODUCER.sign("subscribe", signed["message_id"], signed_kwargs)
    client.hset("dramatiq:billing.msgs", signed["options"]["redis_message_id"], json.dumps(signed))
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while len(seen) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        worker.stop()
    by_id: dict[str, list[tuple[str | None, int]]] = {}
    for message_id, signature, retries in seen:
        by_id.setdefault(message_id, []).append((signature, retries))
    # each delivered twice: the first attempt, then Dramatiq's retry through billing.DQ
    assert by_id[unsigned["message_id"]] == [(None, 0), (None, 1)]
    assert by_id[delayed["message_id"]] == [(None, 0), (None, 1)]
    producer_signature = signed["options"][SIGNATURE_OPTION]
    assert by_id[signed["message_id"]] == [(producer_signature, 0), (producer_signature, 1)]
    assert KEYS.verify("subscribe", signed["message_id"], signed_kwargs, producer_signature) is None


def test_the_workers_own_new_messages_are_still_signed(signing_broker):
    """Outbox relays, scheduler batches: a message created here (no Redis id yet) is signed with the worker's key."""
    import dramatiq

    broker = signing_broker
    broker.declare_queue("billing")
    new = dramatiq.Message(queue_name="billing", actor_name="subscribe", args=(), kwargs=KWARGS, options={})
    one = broker.enqueue(new)
    (many,) = broker.enqueue_many([new.copy(message_id="m-batch")])
    for message in (one, many):
        signature = message.options[SIGNATURE_OPTION]
        assert signature.startswith("v1:k2:")
        assert KEYS.verify("subscribe", message.message_id, KWARGS, signature) is None


def test_an_operator_retry_of_a_dead_lettered_copy_keeps_its_signature(services, db, signing_broker):
    """The dead-letter queue is writable by producers: a retried copy from it is verified, never signed by ops."""
    from db.engine import make_engine
    from workers.operators.actions import retry_failures

    client = signing_broker.client
    kwargs = {**KWARGS, "idempotency_key": "s-xq"}
    # a genuine message failed for good (say its account was missing); someone then rewrote its dead-lettered copy
    copy = _raw(client, "billing.XQ", "subscribe", {**kwargs, "plan_id": "enterprise"})
    db(
        "INSERT INTO failed_messages (message_id, actor_name, queue_name, kwargs, idempotency_key, error_type, "
        "error_message, attempts, status) VALUES ($1, 'subscribe', 'billing', $2, 's-xq', 'unknown_account', "
        "'unknown account', 1, 'dead')",
        copy["message_id"],
        json.dumps(kwargs),
    )

    async def retry():
        engine = make_engine(services.database_url, pool_size=1)
        try:
            return await retry_failures(
                engine, signing_broker, operator="test", via="cli", message_ids=[copy["message_id"]]
            )
        finally:
            await engine.dispose()

    report = asyncio.run(retry())
    assert report.retried == [copy["message_id"]]
    (redis_id,) = client.lrange("dramatiq:billing", 0, -1)
    sent = json.loads(client.hget("dramatiq:billing.msgs", redis_id))
    assert sent["message_id"] == copy["message_id"] and sent["kwargs"]["plan_id"] == "enterprise"
    assert (
        SIGNATURE_OPTION not in sent["options"]
    )  # not signed by the operator's process: the worker refuses it


def test_an_operator_retry_of_an_authentication_failure_is_refused(services, db, signing_broker):
    from db.engine import make_engine
    from workers.operators.actions import retry_failures

    db(
        "INSERT INTO failed_messages (message_id, actor_name, queue_name, kwargs, error_type, error_message, "
        "attempts, status) VALUES ('m-unsigned', 'subscribe', 'billing', $1, 'message_authentication_failed', "
        "'the message is not signed', 1, 'dead')",
        json.dumps(KWARGS),
    )

    async def retry():
        engine = make_engine(services.database_url, pool_size=1)
        try:
            return await retry_failures(
                engine, signing_broker, operator="test", via="cli", message_ids=["m-unsigned"]
            )
        finally:
            await engine.dispose()

    report = asyncio.run(retry())
    assert report.retried == []
    assert "must send it again, signed" in report.skipped["m-unsigned"]
    assert signing_broker.client.llen("dramatiq:billing") == 0
    assert db("SELECT status FROM failed_messages") == [{"status": "dead"}]


def test_raw_writes_to_every_redis_key_a_producer_can_reach_are_never_applied(
    setup, services, db, spawn_worker
):
    """A worker process with keys, and unsigned, forged or tampered messages written into each queue and delay queue.

    Each is recorded as ``message_authentication_failed`` and dead-lettered
    as it came (not re-signed); one written into a dead-letter queue is never
    run; a producer's signed, delayed message goes through the delay queue and
    is applied.
    """
    import redis
    from dramatiq.brokers.redis import RedisBroker

    from tasks.messages import SubscribeMessage
    from tasks.producer import Producer, to_dramatiq_message

    setup(
        accounts=[
            {
                "account_id": "a1",
                "balance_micros": 100 * USD,
                "auto_top_up_threshold_micros": 1 * USD,
                "auto_top_up_amount_micros": 20 * USD,
                "payment_method_ref": "pm_card_ok",
            }
        ],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}, {"plan_id": "team", "price_micros": 10 * USD}],
    )
    client = redis.Redis.from_url(services.redis_db(1))
    forger = SigningKeys(secrets={"k2": "f" * 40}, signing_key_id="k2")

    def sub(key: str) -> dict:
        return {"account_id": "a1", "plan_id": "pro", "idempotency_key": key}

    def top_up(key: str) -> dict:
        return {"account_id": "a1", "idempotency_key": key, "amount_micros": 5 * USD}

    refused = [
        _raw(client, "billing", "subscribe", sub("evil-q")),
        _raw(client, "billing.DQ", "subscribe", sub("evil-dq"), eta=True),
        _raw(
            client,
            "billing.DQ",
            "subscribe",
            sub("evil-dq-forged"),
            signature=forger.sign("subscribe", "x", {}),
            eta=True,
        ),
        _raw(client, "billing.payments", "auto_top_up", top_up("evil-p")),
        _raw(client, "billing.payments.DQ", "auto_top_up", top_up("evil-pdq"), eta=True),
    ]
    # tampered: a genuine signature over other arguments (plan "team" signed, plan "pro" sent)
    tampered = _raw(client, "billing.DQ", "subscribe", sub("evil-dq-tampered"), eta=True)
    tampered["options"][SIGNATURE_OPTION] = PRODUCER.sign(
        "subscribe", tampered["message_id"], {**sub("evil-dq-tampered"), "plan_id": "team"}
    )
    client.hset("dramatiq:billing.DQ.msgs", tampered["options"]["redis_message_id"], json.dumps(tampered))
    refused.append(tampered)
    never_run = [
        _raw(client, "billing.XQ", "subscribe", sub("evil-xq")),
        _raw(client, "billing.payments.XQ", "auto_top_up", top_up("evil-pxq")),
    ]
    producer = Producer(broker=RedisBroker(url=services.redis_db(1)), signing_keys=PRODUCER)
    good = SubscribeMessage(account_id="a1", plan_id="team", idempotency_key="good-delayed")
    producer.broker.enqueue(
        to_dramatiq_message(good), delay=200
    )  # through billing.DQ, signed by the producer
    spawn_worker(**WORKER_ENV)
    ids = [m["message_id"] for m in refused]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = db("SELECT status FROM idempotency_keys WHERE key = 'good-delayed'") == [
            {"status": "completed"}
        ]
        recorded = db("SELECT count(*) AS n FROM failed_messages WHERE message_id = ANY($1)", ids)[0]["n"]
        if done and recorded == len(ids):
            break
        time.sleep(0.1)
    failures = {
        r["message_id"]: r for r in db("SELECT message_id, error_type, attempts FROM failed_messages")
    }
    assert set(failures) == set(ids)
    assert {r["error_type"] for r in failures.values()} == {"message_authentication_failed"}
    assert all(r["attempts"] == 1 for r in failures.values())
    assert db("SELECT key FROM idempotency_keys") == [{"key": "good-delayed"}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'") == [{"n": 1}]
    assert db("SELECT count(*) AS n FROM top_up_attempts") == [{"n": 0}]
    # dead-lettered as they came: nothing signed them on the way
    for message in refused:
        queue = message["queue_name"].removesuffix(".DQ")
        stored = client.hgetall(f"dramatiq:{queue}.XQ.msgs").values()
        copies = [json.loads(p) for p in stored if json.loads(p)["message_id"] == message["message_id"]]
        assert len(copies) == 1
        assert copies[0]["options"].get(SIGNATURE_OPTION) == message["options"].get(SIGNATURE_OPTION)
    for message in never_run:
        assert client.zscore(f"dramatiq:{message['queue_name']}.XQ", message["options"]["redis_message_id"])
        assert not db("SELECT 1 FROM failed_messages WHERE message_id = $1", message["message_id"])
    client.close()
