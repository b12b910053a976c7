"""The RabbitMQ broker (:mod:`workers.rabbitmq`) against a real RabbitMQ server.

``BILLING_TEST_RABBITMQ_URL`` names the server (default
``amqp://guest:guest@127.0.0.1:5672/``); the session makes a fresh vhost of
its own on it with ``rabbitmqctl`` (the URL's own vhost when ``rabbitmqctl``
is not there) and deletes it afterwards.  Without a reachable RabbitMQ these
tests skip with one message; with ``CI`` or ``BILLING_REQUIRE_RABBITMQ=1``
set they fail instead.  PostgreSQL comes from the session's services
(``tests/conftest.py``); worker processes run ``workers.actors`` with
``BILLING_BROKER_URL`` on the test vhost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import dramatiq
import pika
import pika.exceptions
import pytest
from dramatiq.errors import ConnectionClosed

from harness.processes import ROOT, WorkerProcess, worker_command
from tasks.signing import SIGNATURE_OPTION, SigningKeys, SigningMiddleware
from workers.broker import make_broker
from workers.rabbitmq import FETCHED_OPTION, BillingRabbitmqBroker
from workers.settings import Settings

USD = 1_000_000
PRODUCER_SECRET, WORKER_SECRET = "p" * 40, "w" * 40
PRODUCER_KEYS = SigningKeys(secrets={"kp": PRODUCER_SECRET}, signing_key_id="kp")
#: The workers verify the producer's key and sign their own messages with theirs.
WORKER_ENV = {
    "BILLING_SIGNING_KEYS": json.dumps({"kp": PRODUCER_SECRET, "kw": WORKER_SECRET}),
    "BILLING_SIGNING_KEY_ID": "kw",
}
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
QUEUES = ("billing", "billing.payments", "billing.usage")


def _required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("BILLING_REQUIRE_RABBITMQ") == "1"


def _with_vhost(url: str, vhost: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(vhost, safe="")))


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[dict[str, str]]:
    """``{"url": ..., "vhost": ...}``: a fresh vhost on the test RabbitMQ for the session (deleted after)."""
    base = os.environ.get("BILLING_TEST_RABBITMQ_URL", "").strip() or DEFAULT_URL
    try:
        params = pika.URLParameters(base)
        params.socket_timeout = 3
        params.connection_attempts = 1
        pika.BlockingConnection(params).close()
    except Exception as exc:  # noqa: BLE001 - any failure to connect means no RabbitMQ
        message = (
            f"RabbitMQ is not reachable at {urlsplit(base).hostname}:{urlsplit(base).port or 5672}"
            f" ({type(exc).__name__}): set BILLING_TEST_RABBITMQ_URL, or start it (rabbitmq-server -detached)"
        )
        if _required():
            pytest.fail(message + " [CI / BILLING_REQUIRE_RABBITMQ=1: not skipped]")
        pytest.skip(message)
    host = urlsplit(base).hostname or ""
    if shutil.which("rabbitmqctl") is None or host not in ("127.0.0.1", "localhost", "::1"):
        yield {"url": base, "vhost": urlsplit(base).path.lstrip("/") or "/"}
        return
    vhost = f"billing_test_rmq_{uuid.uuid4().hex[:8]}"
    user = urlsplit(base).username or "guest"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield {"url": _with_vhost(base, vhost), "vhost": vhost}
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def make_rmq(rabbitmq: dict[str, str]) -> Iterator[Callable[..., BillingRabbitmqBroker]]:
    """``make_rmq(**settings)``: a broker from :func:`workers.broker.make_broker` on the test vhost.

    Queues are purged before each test; the process's Dramatiq encoder (which
    ``make_broker`` sets) is put back afterwards, so Redis tests after these
    keep requiring the Redis id.
    """
    previous = dramatiq.get_encoder()
    made: list[BillingRabbitmqBroker] = []

    def go(**values: Any) -> BillingRabbitmqBroker:
        values.setdefault("signing_keys", None)
        broker = make_broker(Settings(broker_url=rabbitmq["url"], **values))
        assert isinstance(broker, BillingRabbitmqBroker)
        made.append(broker)
        return broker

    purger = go()
    for queue in ("billing", "billing.payments", "billing.usage", "test.rmq"):
        purger.declare_queue(queue, ensure=True)
        purger.flush(queue)
    yield go
    for broker in made:
        broker.close()
    dramatiq.set_encoder(previous)


def _raw_channel(url: str) -> tuple[Any, Any]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    return connection, connection.channel()


def _queue_arguments(vhost: str) -> dict[str, dict[str, Any]]:
    rows = json.loads(
        _rabbitmqctl(
            "list_queues", "-p", vhost, "name", "type", "durable", "arguments", "--formatter", "json"
        )
    )
    for row in rows:  # arguments come as [[name, type, value], ...] (an empty string as [])
        args = row["arguments"]
        pairs = args.items() if isinstance(args, dict) else ((item[0], item[-1]) for item in args)
        row["arguments"] = {k: ("" if v == [] else v) for k, v in pairs}
    return {row["name"]: row for row in rows}


def _wait(predicate: Callable[[], Any], timeout_s: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- the broker on its own


def test_queues_are_durable_quorum_queues_with_a_delivery_limit_and_messages_are_persistent(
    make_rmq, rabbitmq
):
    # a queue of its own: a queue's arguments are fixed when it is first declared
    broker = make_rmq(rabbitmq_delivery_limit=7, dead_message_ttl_ms=3_600_000)
    broker.declare_queue("test.args", ensure=True)
    sent = broker.enqueue(dramatiq.Message("test.args", "noop", (), {"n": 1}, {}))
    assert broker.channel._delivery_confirmation  # publisher confirms are on this channel

    if shutil.which("rabbitmqctl") is not None and rabbitmq["vhost"].startswith("billing_test_rmq_"):
        queues = _queue_arguments(rabbitmq["vhost"])
        for name in ("test.args", "test.args.DQ"):
            args = queues[name]["arguments"]
            assert queues[name]["type"] == "quorum" and queues[name]["durable"] is True
            assert args["x-queue-type"] == "quorum" and args["x-delivery-limit"] == 7
            assert (
                args["x-dead-letter-exchange"] == "" and args["x-dead-letter-routing-key"] == "test.args.XQ"
            )
            assert args["x-dead-letter-strategy"] == "at-least-once"
            assert "x-max-priority" not in args
        xq = queues["test.args.XQ"]
        assert xq["type"] == "quorum" and xq["arguments"]["x-message-ttl"] == 3_600_000

    assert broker.queue_counts("test.args")[:3] == (1, 0, 0)
    connection, channel = _raw_channel(rabbitmq["url"])
    try:
        method, properties, body = channel.basic_get("test.args", auto_ack=True)
        assert method is not None and properties.delivery_mode == 2  # persistent
        envelope = json.loads(body)
        assert envelope["message_id"] == sent.message_id and "redis_message_id" not in envelope["options"]
    finally:
        connection.close()


def test_billing_ops_queue_overview_reads_rabbitmq_depths(make_rmq):
    from workers.operators import rabbitmq_layout

    broker = make_rmq()
    for i in range(3):
        broker.enqueue(dramatiq.Message("billing.usage", "record_usage", (), {"i": i}, {}))
    broker.enqueue(dramatiq.Message("billing.usage", "record_usage", (), {"i": 9}, {}), delay=60_000)
    stats, workers = rabbitmq_layout.queue_overview(broker)
    usage = next(s for s in stats if s.queue == "billing.usage")
    assert (usage.ready, usage.delayed, usage.dead, usage.in_flight) == (3, 1, 0, None)
    assert workers == []


def test_a_refused_publish_raises_publisher_confirms(make_rmq, rabbitmq):
    """With confirms on, a publish RabbitMQ nacks (a queue at its length limit, reject-publish) raises."""
    if not rabbitmq["vhost"].startswith("billing_test_rmq_"):
        pytest.skip("needs rabbitmqctl on a vhost of the test's own (a policy)")
    broker = make_rmq()
    broker.enqueue_patience_s = 5
    _rabbitmqctl(
        "set_policy",
        "-p",
        rabbitmq["vhost"],
        "full",
        r"^test\.full$",
        '{"max-length": 1}',
        "--apply-to",
        "queues",
    )
    try:
        broker.declare_queue("test.full", ensure=True)
        # a quorum queue checks its limit against what it has committed: one publish may pass it
        refused = None
        for n in range(5):
            started = time.monotonic()
            try:
                broker.enqueue(dramatiq.Message("test.full", "noop", (), {"n": n}, {}))
            except ConnectionClosed as exc:
                refused = exc
                break
        assert refused is not None and isinstance(refused.message, pika.exceptions.NackError)
        assert n <= 2
        assert time.monotonic() - started < 5  # refused: raised at once, not retried for the patience
        assert broker.queue_counts("test.full")[0] == n
    finally:
        _rabbitmqctl("clear_policy", "-p", rabbitmq["vhost"], "full")


def test_a_message_over_the_delivery_limit_is_dead_lettered_to_the_xq(make_rmq, rabbitmq):
    broker = make_rmq(rabbitmq_delivery_limit=2)
    broker.declare_queue("test.limit", ensure=True)
    sent = broker.enqueue(dramatiq.Message("test.limit", "poison", (), {"n": 1}, {}))
    connection, channel = _raw_channel(rabbitmq["url"])
    deliveries = 0
    try:
        # a consumer that gives it back every time (as a worker killed by it would)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            method, _, _ = channel.basic_get("test.limit")
            if method is None:
                if broker.queue_counts("test.limit")[2] == 1:
                    break
                time.sleep(0.1)
                continue
            deliveries += 1
            channel.basic_nack(method.delivery_tag, requeue=True)
        method, _, body = channel.basic_get("test.limit.XQ", auto_ack=True)
    finally:
        connection.close()
    assert method is not None and json.loads(body)["message_id"] == sent.message_id
    assert deliveries == 3  # the first delivery and two returns within the limit


def test_a_retried_or_delayed_message_keeps_its_signature_and_new_messages_are_signed(make_rmq):
    producer = make_rmq()
    producer.add_middleware(SigningMiddleware(PRODUCER_KEYS))
    worker_broker = make_rmq(signing_keys=WORKER_ENV["BILLING_SIGNING_KEYS"], signing_key_id="kw")
    sent = producer.enqueue(dramatiq.Message("test.rmq", "noop", (), {"n": 1}, {}))
    signature = sent.options[SIGNATURE_OPTION]
    assert signature.startswith("v1:kp:")

    consumer = worker_broker.consume("test.rmq", prefetch=4, timeout=1000)
    fetched = _wait(lambda: next(consumer), what="the producer's message")
    assert fetched.options[FETCHED_OPTION] is True
    # what Dramatiq's Retries middleware does with a failed message: enqueue it with a backoff
    worker_broker.enqueue(fetched, delay=1)
    consumer.ack(fetched)
    delayed = worker_broker.consume("test.rmq.DQ", prefetch=4, timeout=1000)
    retry = _wait(lambda: next(delayed), what="the retry on the delay queue")
    assert retry.message_id == sent.message_id and retry.options[SIGNATURE_OPTION] == signature
    # what the worker does when its eta comes: moved to its queue, still the producer's signature
    moved = retry.copy(queue_name="test.rmq")
    del moved.options["eta"]
    worker_broker.enqueue(moved)
    delayed.ack(retry)
    again = _wait(lambda: next(consumer), what="the moved message")
    assert again.options[SIGNATURE_OPTION] == signature
    consumer.ack_many([again])

    fresh = worker_broker.enqueue(dramatiq.Message("test.rmq", "noop", (), {"n": 2}, {}))
    assert fresh.options[SIGNATURE_OPTION].startswith("v1:kw:")  # the worker's own new message
    mine = _wait(lambda: next(consumer), what="the worker's own message")
    consumer.ack_many([mine])
    consumer.close()
    delayed.close()
    assert worker_broker.queue_counts("test.rmq")[:3] == (0, 0, 0)


def test_ack_many_acknowledges_exactly_the_messages_given(make_rmq, rabbitmq):
    broker = make_rmq()
    for i in range(5):
        broker.enqueue(dramatiq.Message("test.rmq", "noop", (), {"i": i}, {}))
    consumer = broker.consume("test.rmq", prefetch=10, timeout=500)
    got = [_wait(lambda: next(consumer), what=f"message {i}") for i in range(5)]
    consumer.ack_many([got[0], got[1], got[3]])  # 2 and 4 stay unacked
    consumer.nack(got[4])  # dead-lettered
    # the acks go out on the consumer's connection thread while it waits for messages
    assert next(consumer) is None
    consumer.close()  # the unacked one goes back to the queue
    counts = _wait(lambda: (c := broker.queue_counts("test.rmq"))[0] == 1 and c, what="one message requeued")
    assert counts[:3] == (1, 0, 1)
    connection, channel = _raw_channel(rabbitmq["url"])
    try:
        method, _, body = channel.basic_get("test.rmq", auto_ack=True)
        assert json.loads(body)["kwargs"] == {"i": 2}
    finally:
        connection.close()


# --------------------------------------------------------------------------- a real worker on RabbitMQ


@pytest.fixture
def rmq_worker(services, rabbitmq, make_rmq, tmp_path) -> Iterator[Callable[..., WorkerProcess]]:
    """``rmq_worker(**env)``: a worker process (``workers.actors``, 2 threads) on the test vhost, consuming."""
    started: list[WorkerProcess] = []

    def go(**extra_env: str) -> WorkerProcess:
        env = {
            **os.environ,
            "BILLING_BROKER_URL": rabbitmq["url"],
            "BILLING_METRICS_ENABLED": "false",
            **extra_env,
        }
        env.pop("BILLING_REDIS_URL", None)  # nothing of the worker may need Redis
        log = tmp_path / f"worker-{len(started)}.log"
        w = WorkerProcess(
            worker_command("workers.actors", processes=1, threads=2), env, log=log, name="rabbitmq"
        ).start()
        started.append(w)

        def consuming() -> bool:
            assert w.poll() is None, f"the worker exited:\n{log.read_text(errors='replace')[-1500:]}"
            if not rabbitmq["vhost"].startswith("billing_test_rmq_"):
                return True  # no rabbitmqctl: the messages wait in their queues for it
            # a quorum queue's declare-ok reports no consumers: ask rabbitmqctl
            rows = _rabbitmqctl("list_queues", "-p", rabbitmq["vhost"], "name", "consumers")
            consumers = dict(line.split("\t") for line in rows.splitlines() if "\t" in line)
            return all(consumers.get(q, "0").isdigit() and int(consumers.get(q, "0")) >= 1 for q in QUEUES)

        _wait(consuming, timeout_s=90, what="the worker's consumers")
        return w

    yield go
    for w in started:
        w.stop(timeout_s=15)


def test_a_signed_subscribe_is_applied_exactly_once_and_unsigned_or_undecodable_ones_never(
    setup, db, rmq_worker, make_rmq, rabbitmq
):
    from tasks.producer import Producer

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 50 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    rmq_worker(**WORKER_ENV)
    producer = Producer(broker=make_rmq(), signing_keys=PRODUCER_KEYS)
    # the same key three times (a producer retrying): one charge
    for _ in range(3):
        producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="signup:a1:pro:1")

    connection, channel = _raw_channel(rabbitmq["url"])
    try:
        channel.confirm_delivery()
        unsigned = {
            "queue_name": "billing",
            "actor_name": "subscribe",
            "args": [],
            "kwargs": {"account_id": "a1", "plan_id": "pro", "idempotency_key": "evil"},
            "options": {},
            "message_id": str(uuid.uuid4()),
            "message_timestamp": int(time.time() * 1000),
        }
        persistent = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        channel.basic_publish("", "billing", json.dumps(unsigned).encode(), persistent)
        channel.basic_publish("", "billing", b"this is not a dramatiq message", persistent)
    finally:
        connection.close()

    # a usage event from the other-language recipe (examples/publish_amqp.py: pika only), signed
    signed_env = {
        "BILLING_BROKER_URL": rabbitmq["url"],
        "BILLING_SIGNING_KEYS": json.dumps({"kp": PRODUCER_SECRET}),
    }
    published = subprocess.run(
        [
            sys.executable,
            "examples/publish_amqp.py",
            "record_usage",
            json.dumps({"account_id": "a1", "amount_micros": 1 * USD, "idempotency_key": "evt_1"}),
        ],
        cwd=ROOT,
        env={**os.environ, **signed_env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert uuid.UUID(published.stdout.strip())

    def status(key: str) -> list[dict[str, Any]]:
        return db("SELECT status FROM idempotency_keys WHERE key = $1", key)

    _wait(
        lambda: (
            status("signup:a1:pro:1") == [{"status": "completed"}]
            and status("evt_1") == [{"status": "completed"}]
            and len(db("SELECT 1 FROM failed_messages")) == 2
        ),
        what="the subscribe and the usage event applied, two failures recorded",
    )
    time.sleep(1.0)  # the duplicates have been processed too (they are deduped, not queued behind)
    assert db("SELECT result->>'outcome' AS o FROM idempotency_keys WHERE key = 'signup:a1:pro:1'") == [
        {"o": "subscribed"}
    ]
    assert db("SELECT amount_micros FROM ledger_entries WHERE kind = 'subscription_charge'") == [
        {"amount_micros": -10 * USD}
    ]
    assert db("SELECT balance_micros FROM accounts WHERE id = 'a1'") == [{"balance_micros": 39 * USD}]
    failures = {
        r["actor_name"]: r for r in db("SELECT actor_name, error_type, message_id FROM failed_messages")
    }
    assert failures["subscribe"]["error_type"] == "message_authentication_failed"
    assert failures["subscribe"]["message_id"] == unsigned["message_id"]
    assert failures["(undecodable)"]["message_id"].startswith("undecodable:sha256:")
    assert db("SELECT 1 FROM idempotency_keys WHERE key = 'evil'") == []
    # both rejected messages are dead-lettered on RabbitMQ, nothing is left to run
    broker = make_rmq()
    _wait(lambda: broker.queue_counts("billing")[:3] == (0, 0, 2), what="two messages in billing.XQ")
