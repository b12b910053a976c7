"""Durable API key delivery end to end: a real worker issues, the worker dies, the consumer still gets the key.

Real processes: ``dramatiq workers.actors`` with ``BILLING_KEY_DELIVERY_PUBLIC_KEY``,
the consumer example (``examples/key_consumer.py``, asyncpg + PyNaCl only)
holding the private key, and the ``billing`` CLI (``keys fetch``,
``ops reissue-key``, ``audit``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import redis

from tasks.key_sealing import generate_keypair
from tests.acceptance.test_cli import billing
from tests.conftest import ROOT
from workers.crash import CRASH_EXIT_STATUS

USD = 1_000_000


def _producer(services):
    from dramatiq.brokers.redis import RedisBroker

    from tasks.producer import Producer

    return Producer(broker=RedisBroker(url=services.redis_db(1)))


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _example_consumer(services, private: str) -> list[dict[str, str]]:
    out = subprocess.run(
        [sys.executable, "examples/key_consumer.py", "--once", "--database-url", services.database_url],
        cwd=ROOT,
        env={**os.environ, "KEY_CONSUMER_PRIVATE_KEY": private},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_a_key_issued_by_a_worker_that_dies_before_delivering_reaches_the_consumer_later(
    setup, services, db, spawn_worker
):
    public, private = generate_keypair()
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 30 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    _producer(services).subscribe(account_id="a1", plan_id="pro", idempotency_key="signup-1")
    # nobody listens, and the worker dies right after commit, before anything is sent anywhere
    crashing = spawn_worker(
        BILLING_CRASHPOINTS="after_commit:signup-1", BILLING_KEY_DELIVERY_PUBLIC_KEY=public
    )
    assert crashing.wait(timeout=60) == CRASH_EXIT_STATUS
    key = db("SELECT id, key_hash, status FROM api_keys")[0]
    assert key["status"] == "active"

    # later, the subscriber's consumer starts and gets the key
    (delivered,) = _example_consumer(services, private)
    assert (delivered["key_id"], delivered["account_id"], delivered["reason"]) == (key["id"], "a1", "issued")
    assert hashlib.sha256(delivered["api_key"].encode()).hexdigest() == key["key_hash"]
    # acknowledged: gone from the queue, its ciphertext dropped
    assert db("SELECT status, sealed_box, acknowledged_by FROM api_key_deliveries") == [
        {"status": "acknowledged", "sealed_box": None, "acknowledged_by": "examples/key_consumer.py"}
    ]
    assert _example_consumer(services, private) == []

    # the redelivery of the unacked message (a duplicate) issues nothing more
    client = redis.Redis.from_url(services.redis_db(1))
    try:
        spawn_worker(BILLING_KEY_DELIVERY_PUBLIC_KEY=public)
        _wait_for(
            lambda: client.hlen("dramatiq:billing.msgs") == 0, 60, "the redelivered message to be acked"
        )
    finally:
        client.close()
    assert db("SELECT count(*) AS n FROM api_keys") == [{"n": 1}]
    assert db("SELECT count(*) AS n FROM api_key_deliveries") == [{"n": 1}]


def test_an_operator_reissues_a_key_once_and_the_consumer_fetches_it_with_the_cli(
    setup, services, db, spawn_worker
):
    public, private = generate_keypair()
    sealing = {"BILLING_KEY_DELIVERY_PUBLIC_KEY": public, "BILLING_OPERATOR": "alice@ops"}
    setup(
        accounts=[{"account_id": f"a{i}", "balance_micros": 30 * USD} for i in (1, 2)],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    producer = _producer(services)
    for i in (1, 2):
        producer.subscribe(account_id=f"a{i}", plan_id="pro", idempotency_key=f"signup-{i}")
    spawn_worker(**sealing)
    _wait_for(lambda: len(db("SELECT 1 FROM api_key_deliveries")) == 2, 60, "two sealed deliveries")
    old = db("SELECT id FROM api_keys WHERE account_id = 'a1'")[0]["id"]
    other = db("SELECT id FROM api_keys WHERE account_id = 'a2'")[0]["id"]

    out = billing("ops", "reissue-key", old, "--idempotency-key", "rotate-1", "--json", env=sealing)
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout)
    again = json.loads(
        billing("ops", "reissue-key", old, "--idempotency-key", "rotate-1", "--json", env=sealing).stdout
    )
    assert again["key_id"] == first["key_id"] and (first["repeat"], again["repeat"]) == (False, True)
    conflict = billing("ops", "reissue-key", other, "--idempotency-key", "rotate-1", env=sealing)
    assert conflict.returncode != 0 and conflict.stderr.count("\n") == 1, conflict.stderr
    assert conflict.stderr.startswith("billing: error: ") and "already reissued" in conflict.stderr
    refused = billing("ops", "reissue-key", old, "--idempotency-key", "rotate-2", env=sealing)
    assert refused.returncode == 2 and "is revoked" in refused.stderr, refused.stderr
    unsealed = billing(
        "ops",
        "reissue-key",
        other,
        "--idempotency-key",
        "rotate-3",
        env={"BILLING_KEY_DELIVERY_PUBLIC_KEY": ""},
    )
    assert unsealed.returncode != 0 and "no public key" in unsealed.stderr, unsealed.stderr
    assert db("SELECT status FROM api_keys WHERE id = $1", other) == [{"status": "active"}]

    # the consumer, with the CLI this time: every pending key, each as one JSON line, then acknowledged
    fetched = billing(
        "keys", "fetch", "--private-key-env", "TEST_PRIVATE_KEY", env={"TEST_PRIVATE_KEY": private}
    )
    assert fetched.returncode == 0, fetched.stderr
    lines = {d["key_id"]: d for d in map(json.loads, fetched.stdout.splitlines())}
    assert set(lines) == {first["key_id"], other}  # the old key's delivery was superseded
    hashes = {r["id"]: r["key_hash"] for r in db("SELECT id, key_hash FROM api_keys")}
    for key_id, line in lines.items():
        assert hashlib.sha256(line["api_key"].encode()).hexdigest() == hashes[key_id]
    assert lines[first["key_id"]]["reason"] == "reissued"
    assert db("SELECT status, count(*) AS n FROM api_key_deliveries GROUP BY status ORDER BY status") == [
        {"status": "acknowledged", "n": 2},
        {"status": "superseded", "n": 1},
    ]
    actions = db("SELECT operator, action, count FROM operator_actions ORDER BY id")
    assert actions == [
        {"operator": "alice@ops", "action": "reissue_key", "count": 1},
        {"operator": "alice@ops", "action": "reissue_key", "count": 0},
    ]
    audit = billing("audit", "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert json.loads(audit.stdout)["violations"]["api_key_delivery_acknowledged"] == []


def test_billing_keys_generate_keypair_prints_a_usable_pair():
    out = billing("keys", "generate-keypair", "--json")
    assert out.returncode == 0, out.stderr
    pair = json.loads(out.stdout)
    from tasks.key_sealing import open_api_key, parse_private_key, public_key_of, seal_api_key

    assert public_key_of(parse_private_key(pair["private_key"])) == pair["public_key"]
    box = seal_api_key(
        pair["public_key"], key_id="k", account_id="a", subscription_id=None, prefix="p", api_key="s"
    )
    assert open_api_key(parse_private_key(pair["private_key"]), box).api_key == "s"


def test_the_example_consumer_listening_gets_a_new_key_at_once_through_notify(
    setup, services, db, spawn_worker
):
    public, private = generate_keypair()
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 30 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    consumer = subprocess.Popen(
        # a poll far longer than the test: only the NOTIFY sent on commit can wake it in time
        [
            sys.executable,
            "examples/key_consumer.py",
            "--poll-s",
            "600",
            "--database-url",
            services.database_url,
        ],
        cwd=ROOT,
        env={**os.environ, "KEY_CONSUMER_PRIVATE_KEY": private},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)  # LISTEN is set up, and the first (empty) pass is done
        spawn_worker(BILLING_KEY_DELIVERY_PUBLIC_KEY=public)
        _producer(services).subscribe(account_id="a1", plan_id="pro", idempotency_key="signup-1")
        assert consumer.stdout is not None
        delivered = json.loads(consumer.stdout.readline())
        # handed over first, acknowledged at its commit just after
        _wait_for(
            lambda: db("SELECT status FROM api_key_deliveries") == [{"status": "acknowledged"}],
            20,
            "the acknowledgement",
        )
    finally:
        consumer.terminate()
        consumer.wait(timeout=10)
    key_hash = db("SELECT key_hash FROM api_keys")[0]["key_hash"]
    assert hashlib.sha256(delivered["api_key"].encode()).hexdigest() == key_hash
