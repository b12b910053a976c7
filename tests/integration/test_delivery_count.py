"""The delivery count that bounds poison messages counts deliveries that never end, not handled errors.

``BILLING_MAX_DELIVERIES`` dead-letters a key delivered that many times
without finishing: a message that kills its worker every time.  A delivery
that fails with a transient error ends under the worker's control (logged,
retried with backoff), so it is taken back out of the count.  Counted, a key
published many times over while PostgreSQL dropped connections passed the
bound, and its later copies were dead-lettered: an effect lost (``make
chaos``, seed 641975).  Both ways a batch or a delivery can fail after its
claim committed are covered: the Python path (a transaction that PostgreSQL
rolls back with a serialization failure) and the group commit (the batch's
apply unreachable).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from tasks.errors import TransientError
from workers.billing import BillingService, Delivery

USD = 1_000_000
MAX_DELIVERIES = 3


def _service(services: Any, **kw: Any) -> BillingService:
    from db.engine import make_engine
    from workers.providers import FakePaymentProvider

    engine = make_engine(services.database_url, pool_size=10)
    return BillingService(
        engine=engine, provider=FakePaymentProvider(engine), max_deliveries=MAX_DELIVERIES, **kw
    )


def _usage(key: str) -> dict[str, Any]:
    return {"account_id": "a1", "amount_micros": USD, "idempotency_key": key}


def _attempts(db: Any, key: str) -> int:
    return int(db("SELECT attempts FROM idempotency_keys WHERE key = $1", key)[0]["attempts"])


def test_transient_failures_on_the_python_path_do_not_use_up_the_delivery_limit(setup, services, db):
    setup(accounts=[{"account_id": "a1", "balance_micros": 10 * USD}])
    # a serialization failure (SQLSTATE 40001) of every usage row: a transient error after the claim
    db(
        "CREATE FUNCTION test_serialization_failure() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'could not serialize' USING ERRCODE = '40001'; END $$"
    )
    db(
        "CREATE TRIGGER test_serialization_failure BEFORE INSERT ON usage_events "
        "FOR EACH ROW EXECUTE FUNCTION test_serialization_failure()"
    )

    async def deliver(times: int) -> list[Any]:
        service = _service(services, usage_fast_path=False)
        try:
            return [
                await asyncio.gather(
                    service.handle("record_usage", _usage("u1"), Delivery(f"copy-{i}")),
                    return_exceptions=True,
                )
                for i in range(times)
            ]
        finally:
            await service.engine.dispose()

    try:
        failed = asyncio.run(deliver(2 * MAX_DELIVERIES))
        assert all(isinstance(r[0], TransientError) for r in failed), failed
        assert _attempts(db, "u1") == 0  # each copy's delivery ended, handled
    finally:
        db("DROP TRIGGER test_serialization_failure ON usage_events")
        db("DROP FUNCTION test_serialization_failure()")
    ((result,),) = asyncio.run(deliver(1))
    assert result["outcome"] == "usage_recorded"
    assert db("SELECT count(*) AS n FROM usage_events") == [{"n": 1}]


def test_a_batch_that_fails_after_its_claim_takes_its_deliveries_back_out_of_the_count(setup, services, db):
    from tasks.errors import DatabaseUnavailable

    setup(accounts=[{"account_id": "a1", "balance_micros": 10 * USD}])

    async def run() -> tuple[list[Any], Any]:
        service = _service(services)
        group = service.group_commits["record_usage"]
        real = group.path.apply

        async def unreachable(*args: Any) -> Any:
            raise DatabaseUnavailable("PostgreSQL is unreachable: connection was closed (test)")

        try:
            group.path = replace(group.path, apply=unreachable)
            failed = [
                await asyncio.gather(
                    *(
                        service.handle("record_usage", _usage(f"b{j}"), Delivery(f"m{i}-{j}"))
                        for j in range(3)
                    ),
                    return_exceptions=True,
                )
                for i in range(2 * MAX_DELIVERIES)
            ]
            group.path = replace(group.path, apply=real)
            done = await asyncio.gather(
                *(service.handle("record_usage", _usage(f"b{j}"), Delivery(f"last-{j}")) for j in range(3))
            )
            return failed, done
        finally:
            await service.engine.dispose()

    failed, done = asyncio.run(run())
    assert all(isinstance(r, DatabaseUnavailable) for batch in failed for r in batch), failed
    assert [r["outcome"] for r in done] == ["usage_recorded"] * 3
    assert db("SELECT count(*) AS n FROM usage_events") == [{"n": 3}]
    assert [_attempts(db, f"b{j}") for j in range(3)] == [1, 1, 1]


@pytest.mark.parametrize("fast", [True, False])
def test_deliveries_that_never_end_are_still_counted_and_dead_lettered(setup, services, db, fast):
    """The bound still holds for a worker that dies: a crash after the claim is not taken back."""
    from workers.crash import SimulatedCrash

    setup(accounts=[{"account_id": "a1", "balance_micros": 10 * USD}])
    step = "fast_after_claim" if fast else "before_commit"

    async def run() -> Any:
        dying = _service(services, usage_fast_path=fast, crashpoints={step: ""})
        try:
            for i in range(MAX_DELIVERIES):
                with pytest.raises(SimulatedCrash):
                    await dying.handle("record_usage", _usage("p1"), Delivery(f"d{i}"))
        finally:
            await dying.engine.dispose()
        service = _service(services, usage_fast_path=fast)
        try:
            return await asyncio.gather(
                service.handle("record_usage", _usage("p1"), Delivery("last")), return_exceptions=True
            )
        finally:
            await service.engine.dispose()

    ((result,),) = [asyncio.run(run())]
    assert type(result).__name__ == "TooManyDeliveries", result
    assert db("SELECT count(*) AS n FROM usage_events") == [{"n": 0}]
