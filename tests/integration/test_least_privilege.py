"""Least privilege: workers run as a role that may insert ledger rows but never rewrite them, nor the schema."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from workers.billing import BillingService, Delivery

USD = 1_000_000


def _as(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.split("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


@pytest.fixture
def worker_role(services):
    from db.config import plain_url
    from db.engine import make_engine, transaction
    from db.roles import grant_worker_role

    role, password = f"billing_worker_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex

    async def grant() -> None:
        engine = make_engine(services.database_url, pool_size=1)
        try:
            async with transaction(engine) as conn:
                await grant_worker_role(conn, role, password=password)
                await grant_worker_role(conn, role)  # a re-run converges
        finally:
            await engine.dispose()

    async def drop() -> None:
        conn = await asyncpg.connect(plain_url(services.database_url))
        try:
            await conn.execute(f'DROP OWNED BY "{role}"')
            await conn.execute(f'DROP ROLE "{role}"')
        finally:
            await conn.close()

    asyncio.run(grant())
    yield _as(services.database_url, role, password)
    asyncio.run(drop())


def test_the_worker_role_runs_the_money_path(setup, db, worker_role):
    from sqlalchemy import text

    from db.engine import make_engine
    from workers.owners import Completer, Reconciler
    from workers.providers import FakePaymentProvider

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

    async def run():
        engine = make_engine(worker_role, pool_size=2)
        service = BillingService(engine=engine, provider=FakePaymentProvider(engine))
        try:
            first = await service.handle(
                "subscribe", {"account_id": "a1", "plan_id": "pro", "idempotency_key": "s1"}, Delivery("m1")
            )
            async with engine.begin() as conn:
                (top_up,) = (
                    (await conn.execute(text("DELETE FROM outbox RETURNING message_id, actor_name, kwargs")))
                    .mappings()
                    .all()
                )
            topped = await service.handle(
                top_up["actor_name"], top_up["kwargs"], Delivery(top_up["message_id"])
            )
            resumed = await service.handle(
                "subscribe", {"account_id": "a1", "plan_id": "pro", "idempotency_key": "s1"}, Delivery("m1")
            )
            # a renewal asked years early decides nothing and forgets its key (DELETE)
            async with engine.connect() as conn:
                sub_id = (await conn.execute(text("SELECT id FROM subscriptions"))).scalar_one()
            early = await service.handle(
                "renew",
                {
                    "subscription_id": sub_id,
                    "period_start": "2099-01-01T00:00:00Z",
                    "idempotency_key": "r-early",
                },
                Delivery("m2"),
            )
            # the owners of the waiting states run as the worker role too (the scheduler's passes)
            await Completer(engine).run_pass()
            await Reconciler(engine, FakePaymentProvider(engine)).run_pass()
            return first["outcome"], topped["outcome"], resumed["outcome"], early["outcome"]
        finally:
            await engine.dispose()

    # short balance, a top-up through the provider, then the subscribe: every table of the money path
    assert asyncio.run(run()) == ("awaiting_top_up", "topped_up", "subscribed", "not_due")
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 15 * USD}]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_entries SET amount_micros = 1",
        "DELETE FROM ledger_entries",
        "CREATE TABLE sneaky (id int)",
        "ALTER TABLE accounts DROP CONSTRAINT accounts_balance_non_negative",
        "DROP TABLE outbox",
        "TRUNCATE ledger_entries",
    ],
)
def test_the_worker_role_cannot_rewrite_the_ledger_or_the_schema(setup, worker_role, statement):
    from db.config import plain_url

    setup(accounts=[{"account_id": "a1", "balance_micros": 5 * USD}])

    async def run() -> None:
        conn = await asyncpg.connect(plain_url(worker_role))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def test_even_the_owner_cannot_update_or_delete_a_ledger_row(setup, db):
    setup(accounts=[{"account_id": "a1", "balance_micros": 5 * USD}])
    for statement in ("UPDATE ledger_entries SET amount_micros = 1", "DELETE FROM ledger_entries"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            db(statement)
    assert db("SELECT amount_micros FROM ledger_entries") == [{"amount_micros": 5 * USD}]
