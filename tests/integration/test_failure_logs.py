"""Every failure is one structured log line, and every duplicate is logged as one.

The money path's log lines are captured by replacing ``workers.billing.log``
with a recorder (structlog caches its loggers, so its own capture helpers
miss them); Dramatiq's own stdlib records are captured with ``caplog``.
Real PostgreSQL, and for the worker tests the session's in-process Dramatiq
worker on real Redis.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import structlog

from tasks.errors import MessageValidationError
from workers.billing import BillingService, Delivery

USD = 1_000_000


class LogRecorder:
    """Stands in for ``workers.billing.log``: keeps each call as a dict, with the bound context."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def __getattr__(self, level: str) -> Any:
        def emit(event: str, **kw: Any) -> None:
            self.lines.append(
                {"level": level, "event": event, **structlog.contextvars.get_contextvars(), **kw}
            )

        return emit

    def of(self, message_id: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("message_id") == message_id]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> LogRecorder:
    from workers import billing

    recorder = LogRecorder()
    monkeypatch.setattr(billing, "log", recorder)
    return recorder


def _service(services: Any, **kw: Any) -> tuple[Any, BillingService]:
    from db.engine import make_engine
    from workers.providers import FakePaymentProvider

    engine = make_engine(services.database_url, pool_size=4)
    return engine, BillingService(engine=engine, provider=FakePaymentProvider(engine), **kw)


@pytest.mark.parametrize(
    ("amount", "says"),
    [(1.5, "amount_micros"), (-5, "amount_micros"), (True, "amount_micros")],
)
def test_a_validation_failure_is_logged_once_as_message_failed(services, db, logs, amount, says):
    async def run() -> None:
        engine, service = _service(services)
        try:
            with pytest.raises(MessageValidationError):
                await service.handle(
                    "auto_top_up",
                    {"account_id": "a1", "idempotency_key": "t1", "amount_micros": amount},
                    Delivery("m-invalid"),
                )
        finally:
            await engine.dispose()

    asyncio.run(run())
    (line,) = logs.of("m-invalid")
    assert line["level"] == "warning" and line["event"] == "message_failed"
    assert line["error"] == "message_validation_error" and says in line["reason"]
    assert line.get("exc_info") is None  # a classified error: no traceback
    assert db("SELECT error_type FROM failed_messages") == [{"error_type": "message_validation_error"}]


def test_a_duplicate_caught_under_the_key_lock_is_logged_as_duplicate_suppressed(
    services, db, setup, logs, monkeypatch
):
    """Two deliveries of one key at once, both past the claim: the one that locks the key second is the duplicate.

    The first delivery is held just before it locks the key row (``money.lock_key``)
    until the second has claimed, applied and committed.
    """
    from db import money

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 30 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    kwargs = {"account_id": "a1", "plan_id": "pro", "idempotency_key": "s1"}
    real_lock_key = money.lock_key

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        engine, service = _service(services)
        first_waits, go_on = asyncio.Event(), asyncio.Event()

        async def lock_key(conn: Any, key: str) -> Any:
            if not first_waits.is_set():
                first_waits.set()
                await go_on.wait()
            return await real_lock_key(conn, key)

        monkeypatch.setattr(money, "lock_key", lock_key)
        try:
            first = asyncio.create_task(service.handle("subscribe", kwargs, Delivery("m1")))
            await first_waits.wait()  # m1 claimed the key and waits before locking it
            second = await service.handle("subscribe", kwargs, Delivery("m2"))
            go_on.set()
            return await first, second
        finally:
            await engine.dispose()

    first, second = asyncio.run(run())
    assert second["outcome"] == "subscribed" and not second.get("duplicate")
    assert first["outcome"] == "subscribed" and first["duplicate"] is True
    assert [line["event"] for line in logs.of("m2")] == ["message_processed"]
    assert [line["event"] for line in logs.of("m1")] == ["duplicate_suppressed"]
    assert logs.of("m1")[0]["outcome"] == "subscribed"
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'") == [{"n": 1}]


def _dramatiq_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("dramatiq")]


def _subscribe_setup(setup: Any) -> None:
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 30 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )


def test_a_provider_timeout_is_one_line_without_a_traceback(
    setup, producer, drain, db, logs, caplog, monkeypatch
):
    """A classified transient error, once: one ``transient_error`` line, no Dramatiq traceback."""
    from db.money import subscribe as subscribe_kind
    from tasks.errors import ProviderTimeout

    _subscribe_setup(setup)
    real, calls = subscribe_kind.apply_subscribe, []

    async def times_out_once(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise ProviderTimeout("the provider did not answer in 10 s")
        return await real(*args, **kw)

    monkeypatch.setattr(subscribe_kind, "apply_subscribe", times_out_once)
    caplog.set_level(logging.DEBUG, logger="dramatiq")
    message_id = producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s1")
    drain()
    assert db("SELECT status FROM idempotency_keys") == [{"status": "completed"}]
    lines = logs.of(message_id)
    assert [(line["level"], line["event"]) for line in lines] == [
        ("warning", "transient_error"),
        ("info", "message_processed"),
    ]
    assert lines[0]["error"] == "ProviderTimeout" and lines[0].get("exc_info") is None
    failures = [r for r in _dramatiq_records(caplog) if r.levelno >= logging.WARNING or r.exc_info]
    assert failures == [], [r.getMessage()[:200] for r in failures]


def test_an_unexpected_exception_is_one_line_with_its_traceback(
    setup, producer, drain, db, logs, caplog, monkeypatch
):
    from db.money import subscribe as subscribe_kind

    _subscribe_setup(setup)

    async def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("a bug in the money path")

    monkeypatch.setattr(subscribe_kind, "apply_subscribe", broken)
    caplog.set_level(logging.DEBUG, logger="dramatiq")
    message_id = producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="s1")
    drain()
    lines = logs.of(message_id)
    # BILLING_MAX_RETRIES=3 in the tests: three retried failures, then the last one recorded
    assert [line["event"] for line in lines] == ["transient_error"] * 3 + ["retries_exhausted"]
    assert all(line["error"] == "RuntimeError" and line.get("exc_info") is not None for line in lines)
    failures = [r for r in _dramatiq_records(caplog) if r.levelno >= logging.WARNING or r.exc_info]
    assert failures == [], [r.getMessage()[:200] for r in failures]
    assert db("SELECT error_type FROM failed_messages") == [{"error_type": "RuntimeError"}]
