"""Fuzzing the message boundary: any keyword arguments, for any actor name, change nothing unless valid.

Hypothesis generates arguments around the contract (extra and missing
fields, floats, booleans and huge numbers for money, unicode and control
characters in ids, nested values, megabyte strings) and feeds them to the
worker's pipeline (:meth:`BillingService.handle`) on a real PostgreSQL, and
to the producer API on a real Redis.  The worker either applies a valid
message or raises a permanent error recorded with its reason; nothing else
escapes, nothing is written to the ledger by an invalid one, and the
producer refuses exactly what the worker would refuse, before enqueueing.

The ids it draws name things that exist: account ``a1`` (with a card for
auto-top-ups) and plan ``pro`` are created before the first example, and
the placeholders ``sub_x``, ``key_x`` and ``period_x`` stand for a1's
subscription, its managed key and its current period end.  Valid messages
(a share of the examples is valid by construction, or valid but for one
field) are therefore really applied; the test counts their outcomes and
fails unless every actor applied some, and the audit passes after each.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from db.audit import run_audit
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

#: Valid arguments for each actor, over the things that exist (placeholders resolved by the test);
#: keys from a small pool, so they repeat (duplicates) and cross actors (idempotency conflicts).
_keys = st.one_of(
    st.sampled_from([f"fz-{i}" for i in range(4)]), st.integers(0, 10**9).map(lambda i: f"fz-{i}")
)
_VALID: dict[str, Any] = {
    "subscribe": st.fixed_dictionaries(
        {"account_id": st.just("a1"), "plan_id": st.sampled_from(["pro", "team"]), "idempotency_key": _keys}
    ),
    "renew": st.fixed_dictionaries(
        {"subscription_id": st.just("sub_x"), "period_start": st.just("period_x"), "idempotency_key": _keys}
    ),
    "auto_top_up": st.fixed_dictionaries(
        {"account_id": st.just("a1"), "idempotency_key": _keys},
        optional={"amount_micros": st.sampled_from([1, 5 * USD]), "reason": st.just("fuzz")},
    ),
    "revoke_key": st.one_of(
        st.fixed_dictionaries(
            {"subscription_id": st.just("sub_x"), "reason": st.just("fuzz"), "idempotency_key": _keys}
        ),
        st.fixed_dictionaries(
            {"key_id": st.just("key_x"), "reason": st.just("fuzz"), "idempotency_key": _keys}
        ),
    ),
}
valid_messages = st.sampled_from(ACTORS).flatmap(lambda a: st.tuples(st.just(a), _VALID[a]))
#: A valid message with one field replaced (or added) by anything.
near_valid_messages = st.tuples(valid_messages, fields, values).map(
    lambda t: (t[0][0], {**t[0][1], t[1]: t[2]})
)
messages = st.one_of(st.tuples(actor_names, kwargs_strategy), valid_messages, near_valid_messages)


_MESSAGE_IDS = itertools.count()


async def _existing_world(service: BillingService) -> dict[str, str]:
    """Account a1 (card on file), plan pro and a1's subscription, created once; the placeholders' values."""
    from db import money
    from db.engine import transaction

    async with engine_rows(service) as rows:
        exists = await rows("SELECT 1 FROM accounts WHERE id = 'a1'")
    if not exists:
        async with transaction(service.engine) as conn:
            for plan in ("pro", "team"):  # a1 subscribes to pro first; team is there for the fuzz
                await money.create_plan(
                    conn, plan_id=plan, name=plan, price_micros=1 * USD, currency="USD", interval="month"
                )
            await money.create_account(
                conn,
                account_id="a1",
                currency="USD",
                balance_micros=1_000 * USD,
                auto_top_up_threshold_micros=1 * USD,
                auto_top_up_amount_micros=10 * USD,
                payment_method_ref="pm_card_ok",
                now=service.clock.now(),
            )
        await service.handle(
            "subscribe",
            {"account_id": "a1", "plan_id": "pro", "idempotency_key": "fuzz-set-up"},
            Delivery("fuzz-set-up"),
        )
    async with engine_rows(service) as rows:
        (sub,) = await rows(
            "SELECT s.id, s.current_period_end, k.id AS key_id FROM subscriptions s "
            "JOIN api_keys k ON k.subscription_id = s.id WHERE s.account_id = 'a1' AND s.plan_id = 'pro'"
        )
    return {"sub_x": sub["id"], "key_x": sub["key_id"], "period_x": sub["current_period_end"].isoformat()}


class engine_rows:  # noqa: N801 - used as ``async with engine_rows(service) as rows``
    """``rows(sql)``: the rows of one query on the service's engine."""

    def __init__(self, service: BillingService) -> None:
        self.service = service

    async def __aenter__(self) -> Any:
        self.conn = await self.service.engine.connect()

        async def rows(sql: str) -> list[dict[str, Any]]:
            return [dict(r) for r in (await self.conn.execute(text(sql))).mappings().all()]

        return rows

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()


def test_any_arguments_are_applied_when_valid_or_refused_and_recorded(services):
    applied: Counter[str] = Counter()  # outcomes of the valid messages applied, ``actor:outcome``

    @settings(max_examples=150)
    @given(message=messages)
    def fuzz(message: tuple[Any, Any]) -> None:
        asyncio.run(_one_message(services, *message, applied))

    fuzz()
    # the valid messages were really applied, for every actor, money included (not refused for a missing id)
    assert {outcome.split(":")[0] for outcome in applied} == set(ACTORS), dict(applied)
    for money_moved in (
        "subscribe:subscribed",
        "renew:renewed",
        "auto_top_up:topped_up",
        "revoke_key:revoked",
    ):
        assert applied[money_moved] >= 1, dict(applied)


async def _one_message(services: Any, actor: Any, kwargs: Any, applied: Counter[str]) -> None:
    from db.engine import make_engine
    from workers.providers import FakePaymentProvider

    engine = make_engine(services.database_url, pool_size=2)
    service = BillingService(engine=engine, provider=FakePaymentProvider(engine))
    try:
        world = await _existing_world(service)
        if isinstance(kwargs, dict):
            kwargs = {k: world.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
        async with engine.begin() as conn:
            before = (await conn.execute(text("SELECT count(*) FROM ledger_entries"))).scalar_one()
            failures_before = (await conn.execute(text("SELECT count(*) FROM failed_messages"))).scalar_one()
        try:
            valid = validate_message(actor, kwargs)
        except MessageValidationError:
            valid = None
        result: dict[str, Any] | None = None
        try:
            result = await service.handle(actor, kwargs, Delivery(f"fuzz-{next(_MESSAGE_IDS)}"))
            refused = None
        except PermanentError as exc:
            refused = exc
        async with engine.begin() as conn:
            after = (await conn.execute(text("SELECT count(*) FROM ledger_entries"))).scalar_one()
            failures_after = (await conn.execute(text("SELECT count(*) FROM failed_messages"))).scalar_one()
        if valid is None:
            # refused at the boundary, with the reason recorded for operators, nothing written
            assert isinstance(refused, MessageValidationError)
            assert (after, failures_after) == (before, failures_before + 1)
        elif refused is not None:
            assert failures_after == failures_before + 1  # unknown account/plan...: recorded
            assert after == before
        else:
            assert result is not None and failures_after == failures_before
            if not result.get("duplicate") and not result.get("waiting"):
                applied[f"{actor}:{result['outcome']}"] += 1
        # whatever came in, every invariant of the audit holds (follow-ups stay in the outbox:
        # the service has no broker, so not the drained checks)
        report = await run_audit(engine, now=service.clock.now())
        assert report.ok, {name: rows for name, rows in report.violations.items() if rows}
    finally:
        await engine.dispose()


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
