"""No secret at rest or in logs: issue keys, run the flows, then look for the plaintexts everywhere.

A real worker process logs at INFO in JSON to a file; afterwards every
table of the database (each row as JSON text), every key of Redis (dumped
whole) and the log are searched for each issued key's plaintext.  The
search is shown to work by finding each key's public prefix.  Issued keys
are sealed to a public key (``BILLING_KEY_DELIVERY_PUBLIC_KEY``) and stay in
``api_key_deliveries`` while the search runs: their ciphertexts are at rest,
their plaintexts nowhere.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import asyncpg
import redis

from tests.conftest import ROOT

USD = 1_000_000


def _wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _database_text(url: str) -> str:
    from db.config import plain_url

    async def dump() -> str:
        conn = await asyncpg.connect(plain_url(url))
        try:
            tables = [
                r["tablename"]
                for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ]
            parts = []
            for table in tables:
                rows = await conn.fetch(f'SELECT row_to_json(t)::text AS j FROM "{table}" t')
                parts.extend(r["j"] for r in rows)
            return "\n".join(parts)
        finally:
            await conn.close()

    return asyncio.run(dump())


def _redis_text(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        parts = []
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                parts.append(repr(client.get(key)))
            elif kind == "hash":
                parts.append(repr(client.hgetall(key)))
            elif kind == "list":
                parts.append(repr(client.lrange(key, 0, -1)))
            elif kind == "set":
                parts.append(repr(client.smembers(key)))
            elif kind == "zset":
                parts.append(repr(client.zrange(key, 0, -1)))
            elif kind == "stream":
                parts.append(repr(client.xrange(key)))
            parts.append(repr(key))
        return "\n".join(parts)
    finally:
        client.close()


def test_issued_key_plaintexts_appear_nowhere_only_their_sealed_deliveries(setup, services, db, tmp_path):
    from dramatiq.brokers.redis import RedisBroker

    from db import money
    from db.engine import make_engine, transaction
    from tasks.key_sealing import generate_keypair, open_api_key, parse_private_key
    from tasks.producer import Producer
    from workers.clock import SystemClock

    setup(
        accounts=[{"account_id": f"a{i}", "balance_micros": 15 * USD} for i in range(3)],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    redis_url = services.redis_db(1)
    public, private = generate_keypair()
    log_path = tmp_path / "worker.log"
    env = {
        **os.environ,
        "BILLING_REDIS_URL": redis_url,
        "BILLING_KEY_DELIVERY_PUBLIC_KEY": public,
        "BILLING_LOG_FORMAT": "json",
        "BILLING_LOG_LEVEL": "DEBUG",
        "BILLING_METRICS_ENABLED": "false",
    }
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "workers.actors", "--processes", "1", "--threads", "2"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            producer = Producer(broker=RedisBroker(url=redis_url))
            for i in range(3):
                producer.subscribe(account_id=f"a{i}", plan_id="pro", idempotency_key=f"s{i}")
            plaintexts: dict[str, str] = {}

            def read_keys() -> bool:
                # opened as the consumer would, but not acknowledged: the ciphertexts stay at rest
                for row in db("SELECT key_id, sealed_box FROM api_key_deliveries WHERE status = 'pending'"):
                    opened = open_api_key(
                        parse_private_key(private), row["sealed_box"], expect_key_id=row["key_id"]
                    )
                    plaintexts[opened.prefix] = opened.api_key
                return len(plaintexts) == 3

            _wait_for(read_keys, 60, "three sealed key deliveries")
            # the flows after issue: a renewal short of funds, a revocation, a user key
            subs = db("SELECT id, current_period_end FROM subscriptions ORDER BY account_id")
            producer.renew(
                subscription_id=subs[0]["id"],
                period_start=subs[0]["current_period_end"],
                idempotency_key="r0",
            )
            producer.revoke_key(subscription_id=subs[1]["id"], reason="customer asked", idempotency_key="v1")

            async def user_key():
                engine = make_engine(services.database_url, pool_size=1)
                try:
                    async with transaction(engine) as conn:
                        return await money.create_user_key(conn, account_id="a2", now=SystemClock().now())
                finally:
                    await engine.dispose()

            issued = asyncio.run(user_key())
            plaintexts[issued.prefix] = issued.plaintext
            # the renewal, asked before its period ends on a short balance, decides
            # nothing and forgets its key (it still runs and logs); the revocation completes
            _wait_for(
                lambda: (
                    db("SELECT count(*) AS n FROM idempotency_keys WHERE status = 'completed'") == [{"n": 4}]
                    and "insufficient_funds_before_period_end" in log_path.read_text()
                ),
                60,
                "the renewal and the revocation",
            )
        finally:
            worker.terminate()
            worker.wait(timeout=30)

    logs = log_path.read_text()
    database = _database_text(services.database_url)
    redis_dump = _redis_text(redis_url)
    assert "message_processed" in logs  # the worker did log its work
    assert db("SELECT count(*) AS n FROM api_key_deliveries WHERE sealed_box IS NOT NULL") == [{"n": 3}]
    for prefix, plaintext in plaintexts.items():
        secret_part = plaintext.split(".", 1)[1]
        assert prefix in database  # the search works: the public prefix is stored
        for where, text in (("the logs", logs), ("PostgreSQL", database), ("Redis", redis_dump)):
            assert plaintext not in text and secret_part not in text, f"a key's plaintext is in {where}"
