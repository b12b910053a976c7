"""`billing worker` stops within its stated bound, however it is signalled (issue 11, defect 9).

The documented bound (docs/deployment.md): every process of a ``billing worker`` has exited at most
``BILLING_WORKER_SHUTDOWN_TIMEOUT_MS`` + 5 s after the first stop signal.
These tests run it with a 1.5 s timeout (so a 6.5 s bound), signal the main
pid or the whole process group (as ``timeout``, systemd and most supervisors
do), with Redis up or down, and check that the process group is empty
afterwards.  An in-flight message either finishes or stays unacked.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]
SHUTDOWN_TIMEOUT_MS = 1_500
BOUND_S = SHUTDOWN_TIMEOUT_MS / 1000 + 5  # the documented bound (docs/deployment.md)
PROCESSES = 2
USD = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class BillingWorker:
    """``billing worker`` in its own session (process group), its stderr in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._stderr = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", "-p", str(PROCESSES), "-t", "2"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
        )
        self.pgid = self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.text().count("Worker process is ready for action.") < PROCESSES:
            if self.proc.poll() is not None:
                raise AssertionError(f"the worker exited at boot ({self.proc.returncode}):\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the worker did not boot:\n{self.text()}")
            time.sleep(0.05)

    def stopped_within(self, bound_s: float) -> float:
        """Seconds until the main pid exited and the process group was empty (fails past ``bound_s``)."""
        start = time.monotonic()
        try:
            self.proc.wait(timeout=bound_s)
            while _group_alive(self.pgid):
                if time.monotonic() - start > bound_s:
                    raise AssertionError("a child of the worker outlived its main process")
                time.sleep(0.02)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the worker did not stop within {bound_s:.1f} s:\n{self.text()[-3000:]}"
            ) from None
        elapsed = time.monotonic() - start
        print(f"stopped in {elapsed:.2f} s (bound {bound_s:.1f} s)")
        return elapsed

    def kill(self) -> None:
        if _group_alive(self.pgid):
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait()
        self._stderr.close()


@pytest.fixture
def start_worker(services: Any, tmp_path: Path) -> Iterator[Any]:
    """``start_worker(redis_url=..., **env)``: a ``billing worker`` killed with its group at teardown."""
    started: list[BillingWorker] = []

    def go(redis_url: str | None = None, **extra_env: str) -> BillingWorker:
        env = {
            **os.environ,
            "BILLING_REDIS_URL": redis_url or services.redis_db(1),
            "BILLING_HEARTBEAT_TIMEOUT_MS": "1000",
            "BILLING_MAINTENANCE_INTERVAL_MS": "200",
            "BILLING_METRICS_ENABLED": "false",
            "BILLING_WORKER_SHUTDOWN_TIMEOUT_MS": str(SHUTDOWN_TIMEOUT_MS),
            **extra_env,
        }
        w = BillingWorker(env, tmp_path / f"worker{len(started)}.log")
        started.append(w)
        return w

    yield go
    for w in started:
        w.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of this test on a free port; ``.stop()`` takes it down."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    client.close()

    class Server:
        url = f"redis://127.0.0.1:{port}/0"

        def stop(self) -> None:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)

    server = Server()
    yield server
    server.stop()


def _signal(worker: BillingWorker, how: str) -> None:
    if how == "main-sigterm":
        os.kill(worker.proc.pid, signal.SIGTERM)
    elif how == "main-sigint":
        os.kill(worker.proc.pid, signal.SIGINT)
    elif how == "group-sigterm":
        os.killpg(worker.pgid, signal.SIGTERM)
    elif how == "group-sigint":  # Ctrl-C in a terminal
        os.killpg(worker.pgid, signal.SIGINT)
    elif how == "group-sigterm-twice":
        os.killpg(worker.pgid, signal.SIGTERM)
        time.sleep(1.2)  # past the 1 s in which signals count as one stop request
        if _group_alive(worker.pgid):
            os.killpg(worker.pgid, signal.SIGTERM)
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["main-sigterm", "main-sigint", "group-sigterm", "group-sigint", "group-sigterm-twice"]
)
def test_the_worker_stops_within_the_bound_with_redis_up(start_worker, how):
    worker = start_worker()
    worker.wait_ready()
    _signal(worker, how)
    worker.stopped_within(BOUND_S)


@pytest.mark.parametrize("how", ["main-sigterm", "group-sigterm"])
def test_the_worker_stops_within_the_bound_after_redis_went_down(start_worker, own_redis, how):
    worker = start_worker(redis_url=own_redis.url)
    worker.wait_ready()
    own_redis.stop()
    time.sleep(0.5)  # the consumers are now failing to reach Redis and backing off
    _signal(worker, how)
    worker.stopped_within(BOUND_S)


def test_the_worker_boots_and_stops_within_the_bound_with_no_redis_listening(start_worker):
    worker = start_worker(redis_url=f"redis://127.0.0.1:{_free_port()}/0")
    worker.wait_ready()  # Dramatiq's consumers retry the connection; the processes boot
    _signal(worker, "group-sigterm")
    worker.stopped_within(BOUND_S)


def _top_up_in_flight(setup, services, db, latency_ms: int, start_worker) -> tuple[BillingWorker, Any]:
    from dramatiq.brokers.redis import RedisBroker

    from tasks.producer import Producer

    setup(
        accounts=[
            {
                "account_id": "a1",
                "balance_micros": 0,
                "auto_top_up_threshold_micros": 1 * USD,
                "auto_top_up_amount_micros": 10 * USD,
                "payment_method_ref": "pm_card_ok",
            }
        ],
    )
    worker = start_worker(BILLING_FAKE_LATENCY_MS=str(latency_ms))
    worker.wait_ready()
    Producer(broker=RedisBroker(url=services.redis_db(1))).auto_top_up(
        account_id="a1", idempotency_key="slow-top-up"
    )
    client = redis.Redis.from_url(services.redis_db(1))
    deadline = time.monotonic() + 30
    # in flight: the attempt is recorded and the fake provider is "on the network"
    while db("SELECT status FROM top_up_attempts") != [{"status": "pending"}]:
        assert time.monotonic() < deadline, "the top-up was never started"
        time.sleep(0.02)
    return worker, client


def test_a_message_in_flight_at_a_group_sigterm_finishes_and_is_acked(setup, services, db, start_worker):
    worker, client = _top_up_in_flight(setup, services, db, 600, start_worker)
    os.killpg(worker.pgid, signal.SIGTERM)
    worker.stopped_within(BOUND_S)
    assert db("SELECT status FROM idempotency_keys WHERE key = 'slow-top-up'") == [{"status": "completed"}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 10 * USD}]
    assert client.hlen("dramatiq:billing.payments.msgs") == 0  # acked
    client.close()


@pytest.mark.parametrize("how", ["main-sigterm", "group-sigterm"])
def test_a_message_still_running_at_the_deadline_is_left_unacked_for_redelivery(
    setup, services, db, start_worker, how
):
    worker, client = _top_up_in_flight(setup, services, db, 30_000, start_worker)
    _signal(worker, how)
    elapsed = worker.stopped_within(BOUND_S)
    assert elapsed > SHUTDOWN_TIMEOUT_MS / 1000  # it had its graceful timeout first
    # not applied and not acked: the message is still held by the dead worker, for redelivery
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 0}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'top_up'") == [{"n": 0}]
    assert db("SELECT status FROM idempotency_keys WHERE key = 'slow-top-up'") == [{"status": "processing"}]
    assert client.hlen("dramatiq:billing.payments.msgs") == 1
    start_worker()  # a healthy worker gets the message back and applies it once
    deadline = time.monotonic() + 30
    while client.hlen("dramatiq:billing.payments.msgs") or client.llen("dramatiq:billing.payments"):
        assert time.monotonic() < deadline, "the unacked top-up was never redelivered"
        time.sleep(0.05)
    assert db("SELECT status FROM idempotency_keys WHERE key = 'slow-top-up'") == [{"status": "completed"}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 10 * USD}]
    client.close()


# --------------------------------------------------------------------------- ShutdownDeadline's rules, in-process


def _dramatiq_like_handler(calls: list[str]) -> Any:
    """A handler shaped like ``dramatiq.cli.worker_process``'s (a closure over ``running``)."""
    running = True

    def termhandler(signum: int, frame: Any) -> None:
        nonlocal running
        if running:
            calls.append("stop")
            running = False
        else:
            calls.append("sys.exit")  # Dramatiq's kill path: the one that hangs on the event loop thread

    return termhandler


def _middleware(timeout_ms: int = 100) -> tuple[Any, list[str], list[int]]:
    from workers.middleware.shutdown import ShutdownDeadline

    calls: list[str] = []
    exits: list[int] = []
    middleware = ShutdownDeadline(timeout_ms, exit=exits.append)
    middleware._previous[signal.SIGTERM] = _dramatiq_like_handler(calls)
    return middleware, calls, exits


def test_signals_within_a_second_are_one_stop_request_and_a_later_one_exits_at_once():
    middleware, calls, exits = _middleware()
    middleware._on_signal(signal.SIGTERM, None)  # the group's copy
    middleware._on_signal(signal.SIGTERM, None)  # the one the main process forwards
    assert calls == ["stop"] and exits == []  # Dramatiq's sys.exit path is never taken
    middleware._first_at -= 1.5  # a second and a half later
    middleware._on_signal(signal.SIGTERM, None)
    assert calls == ["stop"] and exits == [1]


def test_a_stop_that_began_before_the_handler_was_installed_is_not_stopped_twice():
    middleware, calls, exits = _middleware()
    middleware._previous[signal.SIGTERM](signal.SIGTERM, None)  # Dramatiq's own handler, during boot
    middleware._on_signal(signal.SIGTERM, None)  # the group's copy, after boot
    assert calls == ["stop"] and exits == []


def test_the_watchdog_exits_the_timeout_plus_the_grace_after_the_first_request():
    import threading

    from workers.middleware.shutdown import KILL_GRACE_S

    middleware, _, exits = _middleware(timeout_ms=100)
    watchdog = threading.Thread(target=middleware._watch, daemon=True)
    watchdog.start()
    time.sleep(0.2)
    assert exits == []  # not armed before a stop request
    start = time.monotonic()
    middleware.before_worker_shutdown(None, None)
    watchdog.join(timeout=10)
    assert exits == [1]
    assert 0.1 + KILL_GRACE_S - 0.05 <= time.monotonic() - start <= 0.1 + KILL_GRACE_S + 1


def test_the_shutdown_timeout_setting_is_validated_with_one_line():
    from tasks.errors import ConfigurationError
    from workers.middleware.shutdown import shutdown_timeout_ms_from_env

    assert shutdown_timeout_ms_from_env({}) == 20_000
    assert shutdown_timeout_ms_from_env({"BILLING_WORKER_SHUTDOWN_TIMEOUT_MS": "1500"}) == 1500
    for bad in ("soon", "50", "600001"):
        with pytest.raises(ConfigurationError) as info:
            shutdown_timeout_ms_from_env({"BILLING_WORKER_SHUTDOWN_TIMEOUT_MS": bad})
        assert "\n" not in str(info.value) and "BILLING_WORKER_SHUTDOWN_TIMEOUT_MS" in str(info.value)
