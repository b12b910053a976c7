"""Durable API key delivery: sealed in the key's transaction, kept until acknowledged, reissued once per key.

The session's in-process worker is given a recipient public key for each
test (``sealed``); the consumer side holds the private key, as the
subscriber's service would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nacl.exceptions import CryptoError

from tasks.errors import ConfigurationError, IdempotencyConflict, UnknownApiKey
from tasks.key_sealing import generate_keypair, open_api_key, parse_private_key

USD = 1_000_000


@dataclasses.dataclass(frozen=True)
class Recipient:
    public: str
    private: str


@pytest.fixture
def sealed(worker: Any) -> Iterator[Recipient]:
    """The in-process worker seals issued keys to a fresh key pair for this test."""
    from workers import actors

    service = actors.get_service()
    public, private = generate_keypair()
    previous = service.policy
    service.policy = dataclasses.replace(previous, key_delivery_public_key=public)
    yield Recipient(public, private)
    service.policy = previous


def _engine(services):
    from db.engine import make_engine

    return make_engine(services.database_url, pool_size=2)


def _consume(services, private: str, *, fail: bool = False) -> list[Any]:
    """Run the library consumer once; returns what it handed over (and acknowledged)."""
    from workers.key_delivery import consume_deliveries

    got: list[Any] = []

    async def hand_over(item: Any) -> None:
        if fail:
            raise RuntimeError("the customer portal is down")
        got.append(item)

    async def run() -> list[str]:
        engine = _engine(services)
        try:
            return await consume_deliveries(
                engine, private, hand_over, consumer="test", now=datetime.now(UTC)
            )
        finally:
            await engine.dispose()

    acknowledged = asyncio.run(run())
    assert acknowledged == [g.delivery_id for g in got]
    return got


def _subscribe(setup, producer, drain, *, accounts=("a1",)) -> None:
    setup(
        accounts=[{"account_id": a, "balance_micros": 30 * USD} for a in accounts],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    for a in accounts:
        producer.subscribe(account_id=a, plan_id="pro", idempotency_key=f"signup-{a}")
    drain()


def _all_rows_text(db) -> str:
    tables = [r["tablename"] for r in db("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    return "\n".join(
        json.dumps(r["j"]) for t in tables for r in db(f'SELECT row_to_json(x)::text AS j FROM "{t}" x')
    )


def test_a_key_issued_with_nobody_listening_is_kept_sealed_until_the_consumer_acknowledges_it(
    setup, producer, drain, db, services, sealed
):
    _subscribe(setup, producer, drain)
    key = db("SELECT id, key_hash, prefix FROM api_keys")[0]
    result = json.loads(db("SELECT result FROM idempotency_keys WHERE key = 'signup-a1'")[0]["result"])
    (delivery,) = db("SELECT * FROM api_key_deliveries")
    assert (delivery["key_id"], delivery["status"], delivery["reason"]) == (key["id"], "pending", "issued")
    assert result["key_delivery_id"] == delivery["id"]
    assert delivery["recipient_public_key"] == sealed.public
    assert delivery["sealed_box"] is not None and delivery["deliver_by"] > delivery["created_at"]

    (handed,) = _consume(services, sealed.private)
    assert (handed.key.key_id, handed.key.account_id, handed.key_status) == (key["id"], "a1", "active")
    assert hashlib.sha256(handed.key.api_key.encode()).hexdigest() == key["key_hash"]
    assert handed.key.api_key.startswith(key["prefix"] + ".")
    # acknowledged: out of the queue, and the ciphertext is gone too
    (after,) = db("SELECT status, sealed_box, acknowledged_by FROM api_key_deliveries")
    assert after == {"status": "acknowledged", "sealed_box": None, "acknowledged_by": "test"}
    assert _consume(services, sealed.private) == []
    # never stored in the clear, anywhere in the database
    everything = _all_rows_text(db)
    assert handed.key.api_key not in everything and handed.key.api_key.split(".", 1)[1] not in everything


def test_the_ciphertext_alone_cannot_be_read_without_the_private_key(setup, producer, drain, db, sealed):
    _subscribe(setup, producer, drain)
    (row,) = db("SELECT key_id, sealed_box FROM api_key_deliveries")
    _, stranger = generate_keypair()
    with pytest.raises(CryptoError):
        open_api_key(parse_private_key(stranger), row["sealed_box"])
    opened = open_api_key(parse_private_key(sealed.private), row["sealed_box"], expect_key_id=row["key_id"])
    assert opened.api_key.encode() not in row["sealed_box"]
    # another consumer's key sees nothing of it
    assert db(
        "SELECT count(*) AS n FROM api_key_deliveries WHERE recipient_public_key <> $1", sealed.public
    ) == [{"n": 0}]


def test_a_consumer_that_fails_to_hand_over_acknowledges_nothing_and_gets_it_again(
    setup, producer, drain, db, services, sealed
):
    _subscribe(setup, producer, drain, accounts=("a1", "a2"))
    with pytest.raises(RuntimeError, match="portal is down"):
        _consume(services, sealed.private, fail=True)
    assert db("SELECT status, sealed_box IS NOT NULL AS sealed FROM api_key_deliveries") == [
        {"status": "pending", "sealed": True},
        {"status": "pending", "sealed": True},
    ]
    got = _consume(services, sealed.private)
    assert sorted(g.key.account_id for g in got) == ["a1", "a2"]
    assert db("SELECT DISTINCT status FROM api_key_deliveries") == [{"status": "acknowledged"}]


def test_an_accounts_own_public_key_takes_precedence_over_the_deployments(
    setup, producer, drain, db, services, sealed
):
    from workers.key_delivery import set_recipient

    setup(accounts=[{"account_id": "own", "balance_micros": 30 * USD}])
    own_public, own_private = generate_keypair()

    async def configure() -> None:
        engine = _engine(services)
        try:
            await set_recipient(engine, "own", own_public, now=datetime.now(UTC))
        finally:
            await engine.dispose()

    asyncio.run(configure())
    _subscribe(setup, producer, drain, accounts=("a1",))
    producer.subscribe(account_id="own", plan_id="pro", idempotency_key="signup-own")
    drain()
    assert [g.key.account_id for g in _consume(services, sealed.private)] == ["a1"]
    assert [g.key.account_id for g in _consume(services, own_private)] == ["own"]


def _audit(services) -> list[dict[str, Any]]:
    from db.audit import run_audit

    async def run() -> list[dict[str, Any]]:
        engine = _engine(services)
        try:
            return (await run_audit(engine)).violations["api_key_delivery_acknowledged"]
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_audit_flags_a_delivery_not_acknowledged_past_its_deadline(
    setup, producer, drain, db, services, sealed
):
    _subscribe(setup, producer, drain, accounts=("a1", "a2"))
    assert _audit(services) == []  # pending, within the deadline: healthy
    stale = db("SELECT id FROM api_key_deliveries WHERE account_id = 'a2'")[0]["id"]
    db(
        "UPDATE api_key_deliveries SET created_at = created_at - interval '2 days', "
        "deliver_by = deliver_by - interval '2 days' WHERE id = $1",
        stale,
    )
    flagged = _audit(services)
    assert [(v["delivery_id"], v["account_id"]) for v in flagged] == [(stale, "a2")]
    _consume(services, sealed.private)  # acknowledged late: no longer waiting
    assert _audit(services) == []


def _reissue(services, key_id: str, idempotency_key: str, *, public_key: str | None) -> dict[str, Any]:
    from db.money import BillingPolicy
    from workers.key_delivery import reissue_key

    async def run() -> dict[str, Any]:
        engine = _engine(services)
        try:
            return await reissue_key(
                engine,
                key_id=key_id,
                idempotency_key=idempotency_key,
                policy=BillingPolicy(key_delivery_public_key=public_key),
                operator="alice@ops",
                via="cli",
                now=datetime.now(UTC),
            )
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_reissue_revokes_the_key_and_delivers_a_new_one_exactly_once_per_idempotency_key(
    setup, producer, drain, db, services, sealed
):
    from db.money import KeyNotReissuable

    _subscribe(setup, producer, drain, accounts=("a1", "a2"))
    old = db("SELECT id, subscription_id FROM api_keys WHERE account_id = 'a1'")[0]
    other = db("SELECT id FROM api_keys WHERE account_id = 'a2'")[0]["id"]
    first = _reissue(services, old["id"], "rotate-1", public_key=sealed.public)
    assert (first["outcome"], first["old_key_id"], first["repeat"]) == ("reissued", old["id"], False)
    keys = {r["id"]: r for r in db("SELECT id, status, subscription_id, source, revoke_reason FROM api_keys")}
    assert keys[old["id"]]["status"] == "revoked" and first["key_id"] in keys[old["id"]]["revoke_reason"]
    new = keys[first["key_id"]]
    assert (new["status"], new["subscription_id"], new["source"]) == (
        "active",
        old["subscription_id"],
        "managed",
    )
    # the old key's undelivered plaintext is moot: superseded, its ciphertext dropped
    assert db("SELECT status, sealed_box FROM api_key_deliveries WHERE key_id = $1", old["id"]) == [
        {"status": "superseded", "sealed_box": None}
    ]

    # a repeat returns the first outcome and changes nothing
    again = _reissue(services, old["id"], "rotate-1", public_key=sealed.public)
    assert {**again, "repeat": False} == first and again["repeat"] is True
    assert db("SELECT count(*) AS n FROM api_keys") == [{"n": 3}]
    # another key under the same idempotency key is a conflict
    with pytest.raises(IdempotencyConflict, match="already reissued key"):
        _reissue(services, other, "rotate-1", public_key=sealed.public)
    # a revoked key, an unknown key, or no public key to seal to: refused, nothing changed
    with pytest.raises(KeyNotReissuable, match="is revoked"):
        _reissue(services, old["id"], "rotate-2", public_key=sealed.public)
    with pytest.raises(UnknownApiKey):
        _reissue(services, "key_nope", "rotate-3", public_key=sealed.public)
    with pytest.raises(ConfigurationError, match="no public key"):
        _reissue(services, other, "rotate-4", public_key=None)
    assert db("SELECT count(*) AS n FROM api_keys") == [{"n": 3}]
    assert db("SELECT status FROM api_keys WHERE id = $1", other) == [{"status": "active"}]

    # the new key reaches the consumer like any issued key, and matches its hash
    handed = {g.key.key_id: g for g in _consume(services, sealed.private)}
    assert set(handed) == {first["key_id"], other}
    assert handed[first["key_id"]].reason == "reissued"
    key_hash = db("SELECT key_hash FROM api_keys WHERE id = $1", first["key_id"])[0]["key_hash"]
    assert hashlib.sha256(handed[first["key_id"]].key.api_key.encode()).hexdigest() == key_hash

    # audit-logged, the repeat included; the refused calls left nothing
    actions = [
        {**a, "target": json.loads(a["target"]), "details": json.loads(a["details"])}
        for a in db("SELECT operator, via, action, target, count, details FROM operator_actions ORDER BY id")
    ]
    assert [(a["action"], a["count"], a["details"]["repeat"]) for a in actions] == [
        ("reissue_key", 1, False),
        ("reissue_key", 0, True),
    ]
    assert actions[0]["target"] == {"key_id": old["id"]} and actions[0]["operator"] == "alice@ops"


def test_a_user_key_is_not_reissued(setup, services, db, sealed):
    from db import money
    from db.engine import transaction
    from db.money import KeyNotReissuable

    setup(accounts=[{"account_id": "a1", "balance_micros": 0}])

    async def user_key() -> str:
        engine = _engine(services)
        try:
            async with transaction(engine) as conn:
                return (await money.create_user_key(conn, account_id="a1", now=datetime.now(UTC))).key_id
        finally:
            await engine.dispose()

    key_id = asyncio.run(user_key())
    with pytest.raises(KeyNotReissuable, match="user key"):
        _reissue(services, key_id, "rotate-user", public_key=sealed.public)
    assert db("SELECT status FROM api_keys") == [{"status": "active"}]


def test_two_reissues_at_once_under_one_idempotency_key_reissue_once(
    setup, producer, drain, db, services, sealed
):
    from db.money import BillingPolicy
    from workers.key_delivery import reissue_key

    _subscribe(setup, producer, drain)
    key_id = db("SELECT id FROM api_keys")[0]["id"]

    async def run() -> list[dict[str, Any]]:
        engines = [_engine(services), _engine(services)]
        try:
            return list(
                await asyncio.gather(
                    *(
                        reissue_key(
                            e,
                            key_id=key_id,
                            idempotency_key="rotate-race",
                            policy=BillingPolicy(key_delivery_public_key=sealed.public),
                            operator="race",
                            via="cli",
                            now=datetime.now(UTC) + timedelta(seconds=1),
                        )
                        for e in engines
                    )
                )
            )
        finally:
            for e in engines:
                await e.dispose()

    a, b = asyncio.run(run())
    assert a["key_id"] == b["key_id"] and sorted([a["repeat"], b["repeat"]]) == [False, True]
    assert db("SELECT status, count(*) AS n FROM api_keys GROUP BY status ORDER BY status") == [
        {"status": "active", "n": 1},
        {"status": "revoked", "n": 1},
    ]
