"""Batch processing (:mod:`workers.middleware.batches`): a queue's messages run in batches on the event loop.

Real Redis, a real in-process Dramatiq worker.  The generic tests run the
middleware on a broker of their own (Redis database 2, queue
``test.batches``) with a recording actor body, so each message's outcome can
be chosen: success, a transient error (retried through the delay queue), an
expected error (dead-lettered).  The end-to-end test sends usage events
through the session's worker, whose ``billing.usage`` queue is a batch queue
by default.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis

from harness.processes import inprocess_worker
from workers.broker import BillingRedisBroker
from workers.middleware.batches import BatchProcessing

QUEUE = "test.batches"
USD = 1_000_000


class Expected(Exception):
    """An error the test actor declares in ``throws``: dead-lettered, not retried."""


class Recorder:
    """The batch threads' actor body: records each delivery, and fails the ones it is told to."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.fail_first: set[str] = set()  # raise a transient error on the first delivery
        self.fail_always: set[str] = set()  # raise Expected on every delivery
        self.pause_s = 0.0
        self.unfinished_keys: set[str] = set()  # what ``unfinished`` reports
        self.in_flight = 0
        self.order: list[tuple[str, int]] = []  # (key, deliveries running beside it, itself included)

    async def unfinished(self, messages: list[dramatiq.Message[Any]]) -> set[str]:
        return {m.message_id for m in messages if m.kwargs["key"] in self.unfinished_keys}

    async def deliver(self, message: dramatiq.Message[Any]) -> None:
        import asyncio

        key = message.kwargs["key"]
        with self.lock:
            self.calls[key] += 1
            first = self.calls[key] == 1
            self.in_flight += 1
        await asyncio.sleep(0)  # the others handed over with it start too
        with self.lock:
            self.order.append((key, self.in_flight))
        try:
            await self._work(key, first)
        finally:
            with self.lock:
                self.in_flight -= 1

    async def _work(self, key: str, first: bool) -> None:
        import asyncio

        if self.pause_s:
            await asyncio.sleep(self.pause_s)
        if key in self.fail_always:
            raise Expected(key)
        if first and key in self.fail_first:
            raise RuntimeError(f"transient failure of {key}")


@pytest.fixture
def batch_broker(
    services: Any, worker: Any
) -> Iterator[tuple[BillingRedisBroker, Recorder, BatchProcessing]]:
    """A broker of its own on Redis database 2 with BatchProcessing on ``test.batches`` and one actor there.

    It uses the session worker's event loop (``worker``: Dramatiq's AsyncIO
    middleware runs one loop per process).
    """
    broker = BillingRedisBroker(
        url=services.redis_db(2), heartbeat_timeout=5_000, maintenance_interval_ms=200
    )
    recorder = Recorder()
    batches = BatchProcessing(
        recorder.deliver, {QUEUE}, threads=2, batch_size=25, unfinished=recorder.unfinished
    )
    broker.add_middleware(batches)

    @dramatiq.actor(
        broker=broker, queue_name=QUEUE, actor_name="batched", max_retries=3, min_backoff=10, max_backoff=50,
        throws=(Expected,),
    )  # fmt: skip
    def batched(key: str) -> None:  # pragma: no cover - the batch threads run Recorder.deliver instead
        raise AssertionError("a batch queue's actor body runs on the event loop, not here")

    yield broker, recorder, batches
    broker.client.flushdb()
    broker.close()


def _redis_state(client: redis.Redis, queue: str) -> dict[str, int]:
    ns = "dramatiq"
    acks = sum(client.scard(k) for k in client.scan_iter(f"{ns}:__acks__.*.{queue}"))
    return {
        "ready": client.llen(f"{ns}:{queue}"),
        "bodies": client.hlen(f"{ns}:{queue}.msgs"),
        "unacked": acks,
        "delayed": client.hlen(f"{ns}:{queue}.DQ.msgs"),
        "dead": client.zcard(f"{ns}:{queue}.XQ"),
    }


def _wait(predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_each_message_of_a_batch_keeps_its_own_outcome_retry_and_dead_letter(batch_broker):
    broker, recorder, batches = batch_broker
    keys = [f"k{i}" for i in range(200)]
    recorder.fail_first = {"k3", "k50", "k199"}
    recorder.fail_always = {"k7", "k120"}
    actor = broker.get_actor("batched")
    broker.enqueue_many([actor.message(key=k) for k in keys])
    w = inprocess_worker(broker, threads=1)
    w.start()
    try:
        _wait(lambda: sum(recorder.calls.values()) >= 200 + 3)
        _wait(
            lambda: (
                _redis_state(broker.client, QUEUE)
                == {"ready": 0, "bodies": 0, "unacked": 0, "delayed": 0, "dead": 2}
            )
        )
    finally:
        w.stop()
    # every message ran; the transient failures once more, the expected failures up to their retries (none)
    assert {k: n for k, n in recorder.calls.items() if n != 1} == {"k3": 2, "k50": 2, "k199": 2}
    assert set(recorder.calls) == set(keys)
    dead = {m.decode() for m in broker.client.hvals(f"dramatiq:{QUEUE}.XQ.msgs")}
    assert sorted(k for k in ("k7", "k120") for d in dead if f'"{k}"' in d) == ["k120", "k7"]
    # batches, not a thread each: the first 200 arrived together
    threads = batches.batch_threads
    assert sum(t.messages for t in threads) == 200 + 3
    assert sum(t.batches for t in threads) < 200 / 4
    assert max(t.batches for t in threads) >= 1


def test_the_successes_of_a_batch_are_acked_in_one_round_trip(batch_broker, monkeypatch):
    broker, recorder, batches = batch_broker
    actor = broker.get_actor("batched")
    recorder.pause_s = 0.3  # the batch threads are busy while the next batch forms
    single, batched = [], []
    monkeypatch.setattr(broker, "do_ack", lambda *a: single.append(a))  # Dramatiq's one ack per message
    script = broker.ack_many_script

    def ack_many(*, keys: list[str], args: list[Any]) -> Any:
        batched.append(len(args) - 2)  # the time, the worker id, then the message ids
        return script(keys=keys, args=args)

    monkeypatch.setattr(broker, "ack_many_script", ack_many)
    broker.enqueue_many([actor.message(key=f"k{i}") for i in range(50)])
    w = inprocess_worker(broker, threads=1)
    w.start()
    try:
        _wait(lambda: _redis_state(broker.client, QUEUE)["bodies"] == 0)
    finally:
        w.stop()
    ran = sum(t.batches for t in batches.batch_threads)
    assert sum(t.messages for t in batches.batch_threads) == 50
    assert single == []
    assert sum(batched) == 50 and len(batched) == ran <= 4
    assert _redis_state(broker.client, QUEUE)["unacked"] == 0


def test_messages_an_earlier_delivery_did_not_finish_run_alone_after_their_batch(batch_broker):
    """A poison message kills its whole batch, which comes back together: the ones that died before run alone."""
    broker, recorder, batches = batch_broker
    batches.threads = 1
    actor = broker.get_actor("batched")
    keys = [f"k{i}" for i in range(20)]
    recorder.unfinished_keys = {"k4", "k11"}
    broker.enqueue_many([actor.message(key=k) for k in keys])
    w = inprocess_worker(broker, threads=1)
    w.start()
    try:
        _wait(lambda: _redis_state(broker.client, QUEUE)["bodies"] == 0)
    finally:
        w.stop()
    ran = dict(recorder.order)
    assert set(ran) == set(keys) and len(recorder.order) == 20
    assert ran["k4"] == ran["k11"] == 1  # each alone, no other message running beside it
    assert sum(t.alone for t in batches.batch_threads) == 2


def test_a_stopped_worker_gives_back_the_messages_it_fetched_and_did_not_start(batch_broker):
    broker, recorder, batches = batch_broker
    actor = broker.get_actor("batched")
    recorder.pause_s = 1.0
    batches.batch_size = 5
    broker.enqueue_many([actor.message(key=f"k{i}") for i in range(120)])
    w = inprocess_worker(broker, threads=1)
    w.start()
    _wait(lambda: sum(recorder.calls.values()) >= 5)
    w.stop()
    started = sum(recorder.calls.values())
    state = _redis_state(broker.client, QUEUE)
    # what ran is acked; everything else is ready again (none stranded unacked in this process's set)
    assert state["unacked"] == 0
    assert state["ready"] == state["bodies"] == 120 - started
    assert started < 120


def test_usage_events_through_the_worker_batch_queue_are_applied_once_each(
    setup, producer, drain, db, audit, broker
):
    from tasks.messages import RecordUsageMessage

    setup(accounts=[{"account_id": f"acct_b{i}", "balance_micros": 100 * USD} for i in range(3)])
    events = [
        RecordUsageMessage(account_id=f"acct_b{i % 3}", amount_micros=1_000 + i, idempotency_key=f"evt_b{i}")
        for i in range(240)
    ]
    repeats = events[:40]
    batches = next(m for m in broker.middleware if isinstance(m, BatchProcessing))
    before = sum(t.messages for t in batches.batch_threads), sum(t.batches for t in batches.batch_threads)
    producer.record_usage_many(events + repeats)
    drain()
    rows = db("SELECT idempotency_key, amount_micros FROM usage_events ORDER BY idempotency_key")
    assert len(rows) == 240
    assert {r["idempotency_key"]: r["amount_micros"] for r in rows} == {
        e.idempotency_key: e.amount_micros for e in events
    }
    spent = db(
        "SELECT sum(100 * 1000000 - balance_micros)::bigint AS spent FROM accounts WHERE id LIKE 'acct_b%'"
    )
    assert spent[0]["spent"] == sum(e.amount_micros for e in events)
    # the batch threads took them, in batches (fewer ledger entries than events: grouped per account)
    messages = sum(t.messages for t in batches.batch_threads) - before[0]
    ran = sum(t.batches for t in batches.batch_threads) - before[1]
    assert messages == 280
    assert ran < 280
    entries = db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'usage_charge'")[0]["n"]
    assert entries < 240
    audit()
