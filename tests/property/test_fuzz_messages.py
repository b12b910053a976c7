"""Fuzzing the message boundary: any keyword arguments, for any actor name, change nothing unless valid.

Hypothesis generates arguments around the contract (extra and missing
fields, floats, booleans and huge numbers for money, unicode and control
characters in ids, nested values, megabyte strings) and feeds them to the
worker's pipeline (:meth:`BillingService.handle`) on a real PostgreSQL, and
to the producer API on a real Redis.  The worker either applies a valid
message or raises a permanent error recorded with its reason; nothing else
escapes, nothing is written to the ledger by an invalid one, and the
producer refuses exactly what the worker would refuse, before enqueueing.
"""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from tasks.errors import MessageValidationError, PermanentError
from tasks.messages import validate_message
from workers.billing import BillingService, Delivery

USD = 1_000_000
ACTORS = ["subscribe", "renew", "auto_top_up", "revoke_key"]

#: Code points no JSON text or PostgreSQL text can carry as characters: lone UTF-16 surrogates
#: (JavaScript's ``JSON.stringify`` writes half an emoji as ``"\\ud83c"``) and NUL.
not_text = st.one_of(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.just("\x00"))
ids = st.one_of(
    st.sampled_from(["a1", "pro", "sub_x", "key_x"]),
    st.text(min_size=0, max_size=300),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20),
    # a valid-looking id with a lone surrogate (or NUL) inside
    st.builds(
        lambda a, bad, b: a + bad + b, st.sampled_from(["a1", "pro", "k"]), not_text, st.text(max_size=3)
    ),
    st.text(alphabet=not_text, min_size=1, max_size=3),
)
amounts = st.one_of(
    st.integers(min_value=-(10**16), max_value=10**16),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.none(),
)
values = st.one_of(
    ids,
    amounts,
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.dictionaries(st.text(alphabet=not_text, min_size=1, max_size=2), ids, max_size=2),
)
fields = st.one_of(
    st.sampled_from(
        [
            "account_id",
            "plan_id",
            "idempotency_key",
            "subscription_id",
            "period_start",
            "amount_micros",
            "reason",
            "key_id",
            "extra",
        ]
    ),
    st.builds(lambda bad: "account_id" + bad, not_text),  # a field name with a lone surrogate
)
kwargs_strategy = st.dictionaries(fields, values, max_size=6)
actor_names = st.one_of(st.sampled_from(ACTORS), st.text(max_size=20))


_MESSAGE_IDS = itertools.count()


@settings(max_examples=150)
@given(actor=actor_names, kwargs=kwargs_strategy)
def test_any_arguments_are_applied_when_valid_or_refused_and_recorded(services, actor, kwargs):
    from db.engine import make_engine
    from workers.providers import FakePaymentProvider

    async def run() -> None:
        engine = make_engine(services.database_url, pool_size=2)
        service = BillingService(engine=engine, provider=FakePaymentProvider(engine))
        try:
            async with engine.begin() as conn:
                before = (await conn.execute(text("SELECT count(*) FROM ledger_entries"))).scalar_one()
                failures_before = (
                    await conn.execute(text("SELECT count(*) FROM failed_messages"))
                ).scalar_one()
            try:
                valid = validate_message(actor, kwargs)
            except MessageValidationError:
                valid = None
            try:
                await service.handle(actor, kwargs, Delivery(f"fuzz-{next(_MESSAGE_IDS)}"))
                refused = None
            except PermanentError as exc:
                refused = exc
            async with engine.begin() as conn:
                after = (await conn.execute(text("SELECT count(*) FROM ledger_entries"))).scalar_one()
                failures_after = (
                    await conn.execute(text("SELECT count(*) FROM failed_messages"))
                ).scalar_one()
            if valid is None:
                # refused at the boundary, with the reason recorded for operators, nothing written
                assert isinstance(refused, MessageValidationError)
                assert (after, failures_after) == (before, failures_before + 1)
            elif refused is not None:
                assert failures_after == failures_before + 1  # unknown account/plan...: recorded
                assert after == before
        finally:
            await engine.dispose()

    asyncio.run(run())


@settings(max_examples=80)
@given(
    actor=st.sampled_from(ACTORS),
    big=st.sampled_from(["account_id", "idempotency_key", "reason", "extra"]),
)
def test_megabyte_arguments_are_refused_and_stored_truncated(services, actor, big):
    from db.engine import make_engine
    from workers.providers import FakePaymentProvider

    kwargs = {"account_id": "a1", "plan_id": "pro", "idempotency_key": "k", big: "x" * (10 * 1024 * 1024)}

    async def run() -> int:
        engine = make_engine(services.database_url, pool_size=1)
        service = BillingService(engine=engine, provider=FakePaymentProvider(engine))
        try:
            try:
                await service.handle(actor, kwargs, Delivery(f"big-{actor}-{big}"))
            except MessageValidationError:
                pass
            else:
                raise AssertionError("a 10 MB argument was accepted")
            async with engine.begin() as conn:
                return (
                    await conn.execute(
                        text("SELECT length(kwargs::text) FROM failed_messages WHERE message_id = :m"),
                        {"m": f"big-{actor}-{big}"},
                    )
                ).scalar_one()
        finally:
            await engine.dispose()

    assert asyncio.run(run()) < 70_000


@settings(max_examples=150)
@given(actor=actor_names, kwargs=kwargs_strategy)
def test_the_producer_refuses_exactly_what_the_worker_refuses_before_enqueueing(actor, kwargs):
    import dramatiq
    from dramatiq.brokers.stub import StubBroker

    from tasks.producer import Producer

    broker = StubBroker()
    for queue in ("billing", "billing.payments"):
        broker.declare_queue(queue)
    producer = Producer(broker=broker)
    try:
        validate_message(actor, kwargs)
        worker_accepts = True
    except MessageValidationError:
        worker_accepts = False
    try:
        producer.publish_raw(actor, kwargs)
        producer_accepts = True
    except MessageValidationError:
        producer_accepts = False
    queued = sum(broker.queues[q].qsize() for q in ("billing", "billing.payments"))
    assert producer_accepts == worker_accepts
    assert queued == (1 if worker_accepts else 0)
    assert isinstance(broker, dramatiq.Broker)
