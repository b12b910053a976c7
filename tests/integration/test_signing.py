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
