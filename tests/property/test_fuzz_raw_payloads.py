"""Fuzzing the raw Redis payload: bytes that are not a Dramatiq message reach operators, not the ledger.

Hypothesis writes payloads straight into the ``billing`` queue with
Dramatiq's own enqueue script, as an attacker or a broken producer with
access to Redis would: random bytes, JSON that is not an object, envelopes
with a missing, unknown or mistyped field.  The session's in-process worker
(the real actors on the real PostgreSQL and Redis) must record each one in
``failed_messages`` with its reason, move it to Dramatiq's dead-letter queue,
take it out of its acknowledgement set (stock Dramatiq left it there and
restarted its consumer), write nothing to the ledger, and keep processing
valid messages.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from dramatiq.common import current_millis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

USD = 1_000_000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
WRONG_TYPES: list[Any] = [None, 1, 1.5, "x", [], {}, True]
REQUIRED = ["queue_name", "actor_name", "args", "kwargs", "options"]
TYPES: dict[str, type] = {
    "queue_name": str,
    "actor_name": str,
    "args": list,
    "kwargs": dict,
    "options": dict,
    "message_id": str,
    "message_timestamp": int,
}
mutations = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(REQUIRED), st.none()),
    st.tuples(
        st.just("retype"),
        st.sampled_from(sorted(TYPES)),
        st.sampled_from(range(len(WRONG_TYPES))),
    ).filter(lambda m: not isinstance(WRONG_TYPES[m[2]], TYPES[m[1]]) or isinstance(WRONG_TYPES[m[2]], bool)),
    st.tuples(
        st.just("extra"), st.text(min_size=1, max_size=10).filter(lambda k: k not in TYPES), json_values
    ),
    st.tuples(st.just("no_redis_id"), st.none(), st.none()),
)
#: Bytes that are not UTF-8: a surrogate encoded as UTF-8 (CESU-8, what some encoders write for a
#: lone JavaScript surrogate), an overlong NUL, a stray continuation byte, a truncated sequence.
NOT_UTF8 = [b"\xed\xa0\xbc", b"\xed\xbf\xbf", b"\xc0\x80", b"\x80", b"\xf0\x9f\x8e"]
payload_specs = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=300)),
    st.tuples(
        st.just("bytes"),
        st.builds(
            lambda bad, at: (
                b'{"queue_name": "billing", "actor_name": "renew", "x": "' + bad + b'"}'[:at] + bad
            ),
            st.sampled_from(NOT_UTF8),
            st.integers(0, 60),
        ),
    ),
    st.tuples(st.just("json"), json_values.filter(lambda v: not isinstance(v, dict))),
    st.tuples(st.just("envelope"), mutations),
)


def _payload(spec: tuple[str, Any], redis_id: str) -> bytes:
    kind, value = spec
    if kind == "bytes":
        return bytes(value)
    if kind == "json":
        return json.dumps(value).encode()
    envelope: dict[str, Any] = {
        "queue_name": "billing",
        "actor_name": "renew",
        "args": [],
        "kwargs": {"subscription_id": "s", "period_start": "2026-01-01T00:00:00Z", "idempotency_key": "k"},
        "options": {"redis_message_id": redis_id},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": current_millis(),
    }
    op, name, arg = value
    if op == "drop":
        del envelope[name]
    elif op == "retype":
        envelope[name] = WRONG_TYPES[arg]
    elif op == "extra":
        envelope[name] = arg
    else:
        envelope["options"] = {}
    return json.dumps(envelope).encode()


def push_raw(broker: Any, payload: bytes, queue: str = "billing", redis_id: str | None = None) -> str:
    """Write ``payload`` into ``queue`` with Dramatiq's enqueue script; returns its Redis message id."""
    redis_id = redis_id or str(uuid.uuid4())
    broker.scripts["dispatch"](
        keys=[broker.namespace],
        args=[
            "enqueue",
            current_millis(),
            queue,
            broker.broker_id,
            broker.heartbeat_timeout,
            broker.dead_message_ttl,
            0,
            broker._max_unpack_size(),
            redis_id,
            payload,
        ],
    )
    return redis_id


def _wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _assert_rejected(
    broker: Any, db: Callable[..., Any], redis_id: str, payload: bytes, queue: str = "billing"
) -> dict[str, Any]:
    rows = _wait_for(
        lambda: db("SELECT * FROM failed_messages WHERE message_id = $1", f"undecodable:{redis_id}"),
        f"the failure record of {payload[:60]!r}",
    )
    failure = rows[0]
    assert failure["error_type"] == "message_validation_error"
    assert failure["error_message"].startswith("undecodable payload")
    assert failure["actor_name"] == "(undecodable)" and failure["queue_name"] == queue
    assert failure["status"] == "dead"
    client, ns = broker.client, broker.namespace
    # dead-lettered, and no longer held by the worker (stock Dramatiq left it in the ack set)
    _wait_for(lambda: client.zscore(f"{ns}:{queue}.XQ", redis_id) is not None, "the dead-letter entry")
    assert client.hget(f"{ns}:{queue}.XQ.msgs", redis_id) == payload
    assert not any(client.sismember(k, redis_id) for k in client.scan_iter(f"{ns}:__acks__.*"))
    assert client.hget(f"{ns}:{queue}.msgs", redis_id) is None
    return failure


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=payload_specs)
def test_raw_payloads_that_are_not_messages_are_recorded_and_dead_lettered(broker, worker, db, spec):
    redis_id = str(uuid.uuid4())
    payload = _payload(spec, redis_id)
    push_raw(broker, payload, redis_id=redis_id)  # an envelope names its own Redis id
    _assert_rejected(broker, db, redis_id, payload)
    assert db("SELECT count(*) AS n FROM ledger_entries")[0]["n"] == 0


#: Text no JSON text or PostgreSQL text can hold as a character: lone UTF-16 surrogates (JavaScript's
#: ``JSON.stringify`` writes half an emoji as ``"\\ud83c"``), a reversed pair, and NUL.
bad_text = st.one_of(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.just("\udc3c\ud83c"),
    st.just("\x00"),
)
texts_with_bad = st.builds(
    lambda before, bad, after: before + bad + after, st.text(max_size=8), bad_text, st.text(max_size=8)
)


@st.composite
def envelopes_with_bad_text(draw: Any) -> tuple[str, dict[str, Any]]:
    """A well-formed Dramatiq envelope whose arguments hold bad text in a value, a key or a nested value."""
    actor = draw(st.sampled_from(["subscribe", "renew", "auto_top_up", "revoke_key"]))
    kwargs: dict[str, Any] = {"idempotency_key": "k", "account_id": "a1", "plan_id": "pro"}
    where = draw(st.sampled_from(["value", "key", "nested", "number"]))
    bad = draw(texts_with_bad)
    if where == "number":  # the tokens NaN and Infinity: Python's JSON decoder takes them, JSON has none
        kwargs[draw(st.sampled_from(["amount_micros", "account_id"]))] = draw(
            st.sampled_from([float("nan"), float("inf"), float("-inf")])
        )
    elif where == "value":
        kwargs[draw(st.sampled_from(sorted(kwargs)))] = bad
    elif where == "key":
        kwargs[bad] = "x"
    else:
        kwargs["extra"] = {"list": [1, bad]}
    return actor, kwargs


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=envelopes_with_bad_text())
def test_a_message_json_cannot_carry_is_recorded_once_as_invalid(broker, worker, db, spec):
    """A lone surrogate (as a JavaScript producer writes it), NUL or NaN: a validation failure, recorded once."""
    actor, kwargs = spec
    redis_id, message_id = str(uuid.uuid4()), str(uuid.uuid4())
    envelope = {
        "queue_name": "billing.payments" if actor == "auto_top_up" else "billing",
        "actor_name": actor,
        "args": [],
        "kwargs": kwargs,
        "options": {"redis_message_id": redis_id},
        "message_id": message_id,
        "message_timestamp": current_millis(),
    }
    payload = json.dumps(envelope).encode()  # ASCII escapes, "\ud83c", as JSON.stringify writes them
    push_raw(broker, payload, queue=envelope["queue_name"], redis_id=redis_id)
    rows = _wait_for(
        lambda: db("SELECT * FROM failed_messages WHERE message_id = $1", message_id),
        f"the failure record of {payload[:80]!r}",
    )
    (failure,) = rows
    assert failure["error_type"] == "message_validation_error", failure["error_message"]
    assert any(w in failure["error_message"] for w in ("surrogate", "NUL", "not a JSON number"))
    assert failure["attempts"] == 1 and failure["status"] == "dead"
    stored = json.loads(failure["kwargs"])  # escaped, so that jsonb holds it
    assert any(w in json.dumps(stored) for w in ("\\u", "\\x00", "NaN", "Infinity"))
    client, ns = broker.client, broker.namespace
    queue = envelope["queue_name"]
    _wait_for(lambda: client.zscore(f"{ns}:{queue}.XQ", redis_id) is not None, "the dead-letter entry")
    assert db("SELECT count(*) AS n FROM idempotency_keys")[0]["n"] == 0
    assert db("SELECT count(*) AS n FROM ledger_entries")[0]["n"] == 0


def test_the_worker_keeps_billing_after_garbage_and_a_10_mb_payload(
    broker, worker, db, setup, producer, drain
):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    huge = b"\xff" + b"x" * (10 * 1024 * 1024)
    ids = [
        push_raw(broker, b"not json"),
        push_raw(broker, huge),
        push_raw(broker, b'{"actor_name": "renew"}'),
    ]
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="after-garbage")
    drain()
    for redis_id, payload in zip(ids, [b"not json", huge, b'{"actor_name": "renew"}'], strict=True):
        stored = json.loads(_assert_rejected(broker, db, redis_id, payload)["kwargs"])
        assert stored["bytes"] == len(payload)
        assert len(stored["payload"]) <= 2000
    assert db("SELECT balance_micros FROM accounts WHERE id = 'a1'")[0]["balance_micros"] == 90 * USD


def test_an_undecodable_payload_is_kept_in_the_queue_while_it_cannot_be_recorded(services, broker, db):
    """PostgreSQL unreachable: the payload is requeued, not dropped, and recorded once it answers.

    Runs its own consumer on a queue the session's worker does not serve.
    """
    from db.engine import make_engine
    from workers.billing import BillingService
    from workers.broker import _BillingConsumer
    from workers.providers import FakePaymentProvider

    queue = "billing.fuzz"
    calls: list[str] = []

    def record(queue_name: str, redis_id: str, payload: bytes, error: BaseException) -> None:
        calls.append(redis_id)
        if len(calls) == 1:
            raise ConnectionRefusedError("PostgreSQL is down")

        async def go() -> None:
            engine = make_engine(services.database_url, pool_size=1)
            try:
                service = BillingService(engine=engine, provider=FakePaymentProvider(engine))
                await service.record_undecodable(queue_name, redis_id, payload, error)
            finally:
                await engine.dispose()

        asyncio.run(go())

    original = broker.undecodable_handler
    broker.undecodable_handler = record
    try:
        redis_id = push_raw(broker, b"\x00garbage", queue)
        consumer = _BillingConsumer(broker, queue, prefetch=1, timeout=100)
        # the first delivery cannot be recorded: requeued, nothing dead-lettered
        _wait_for(lambda: calls or consumer.__next__() or calls, "the first delivery")
        assert broker.client.zscore(f"{broker.namespace}:{queue}.XQ", redis_id) is None
        assert broker.do_qsize(queue) == 1
        # the next delivery is recorded and dead-lettered
        _wait_for(lambda: len(calls) > 1 or consumer.__next__() or len(calls) > 1, "the second delivery")
        _assert_rejected(broker, db, redis_id, b"\x00garbage", queue)
    finally:
        broker.undecodable_handler = original
