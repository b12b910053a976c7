"""``billing worker`` serves Dramatiq's metrics and the billing metrics on one endpoint.

A real ``billing worker`` (which execs ``dramatiq workers.actors``: a master,
one worker process and Dramatiq's exposition fork) consumes from its own Redis
database, with no metrics directory configured: ``TMPDIR`` points into the
test's directory, so the fresh directory it makes is cleaned up with it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

USD = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, OSError):
        return ""


class BillingWorker:
    """``billing worker --processes 1 --threads 2`` on Redis database 1, logging to ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "worker", "--processes", "1", "--threads", "2"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text()[-3000:]

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert self.proc.poll() is None, f"the worker exited ({self.proc.returncode}):\n{self.log()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log()}"
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM (the master stops its worker and fork processes), then wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def start_worker(services: Any, tmp_path: Path) -> Iterator[Callable[[int], BillingWorker]]:
    started: list[BillingWorker] = []

    def go(port: int) -> BillingWorker:
        env = {
            **os.environ,
            "BILLING_REDIS_URL": services.redis_db(1),
            "BILLING_METRICS_HOST": "127.0.0.1",
            "BILLING_METRICS_PORT": str(port),
            "TMPDIR": str(tmp_path),
        }
        env.pop("BILLING_METRICS_DIR", None)
        worker = BillingWorker(env, tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker

    yield go
    for worker in started:
        worker.stop()


@pytest.fixture
def subscribe(services: Any, setup: Callable[..., None]) -> Iterator[Callable[[str], None]]:
    """``subscribe(key)``: publish a subscribe of account a1 to plan pro on Redis database 1."""
    from dramatiq.brokers.redis import RedisBroker

    from tasks.producer import Producer

    setup(
        accounts=[{"account_id": "a1", "balance_micros": 30 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 20 * USD}],
    )
    broker = RedisBroker(url=services.redis_db(1))
    producer = Producer(broker=broker)

    def go(key: str) -> None:
        producer.subscribe(account_id="a1", plan_id="pro", idempotency_key=key)

    yield go
    broker.close()


def test_one_endpoint_shows_dramatiq_and_billing_metrics_of_a_real_worker(
    start_worker, subscribe, db, tmp_path: Path
):
    port = _free_port()
    worker = start_worker(port)
    subscribe("m1")
    expected = (
        'billing_charges_total{kind="subscription_charge"} 1.0',
        'billing_outcomes_total{actor="subscribe",outcome="subscribed"} 1.0',
        'billing_enqueue_to_commit_seconds_count{actor="subscribe"} 1.0',
        'dramatiq_messages_total{actor_name="subscribe",queue_name="billing"} 1.0',
    )
    worker.wait_for(lambda: all(line in _scrape(port) for line in expected), "the metrics")
    assert db("SELECT status FROM idempotency_keys WHERE key = 'm1'") == [{"status": "completed"}]
    # the worker made its own multiprocess directory, and wrote its files there
    (metrics_dir,) = tmp_path.glob("billing-metrics-*")
    assert any(metrics_dir.glob("counter_*.db")) and any(metrics_dir.glob("histogram_*.db"))

    assert worker.stop() == 0, worker.log()
    # the exposition fork stopped with the worker
    deadline = time.monotonic() + 5
    while _scrape(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _scrape(port) == ""


def test_a_taken_metrics_port_does_not_stop_processing(start_worker, subscribe, db):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        worker = start_worker(taken.getsockname()[1])
        subscribe("m1")
        completed = [{"status": "completed"}]
        worker.wait_for(
            lambda: db("SELECT status FROM idempotency_keys WHERE key = 'm1'") == completed, "the subscribe"
        )
        worker.wait_for(lambda: "Address already in use" in worker.log(), "the exposition error")
    assert worker.stop() == 0, worker.log()
