"""The short chaos run: faults while load flows, then the oracle, in ``make test``.

``python -m harness.chaos`` runs as a subprocess, as ``make chaos`` does, but
for 30 s and 3,000 messages with a fixed seed: SIGKILLed workers, a Redis
restart, terminated PostgreSQL connections, the ``billing.payments`` workers
stopped for longer than the delivery limit while renewals wait for their
top-ups, injected-clock jumps past the key lease, the top-up deadline and
the grace period, a fake provider that declines, fails, times out after
charging, never answers (``pm_never_answers``), charges and never answers
(``pm_silent_charge``) or answers ``processing`` for a while
(``pm_processing``, ``pm_processing_fail``), and poison messages.  At the
end the runner drives every owner past its deadline on the injected clock,
then counts double charges, lost effects and unpaid entitled periods
(``harness.chaos.count_promise``; tests/integration/test_chaos_oracle.py
shows each check both ways) and runs the quiescent audit at that clock.
It uses the test session's PostgreSQL server (a fresh ``billing_chaos_*``
database on it) and starts its own append-only redis-server.  The checks
hold for any fault timing: a failure here is a bug to report, never a
flake to retry, and nothing is excused.

Two bugs of Dramatiq 2.2 around a Redis restart were found this way and are
fixed in ``workers/broker.py``; each has a regression test below that
checks the restart really hit its window (and fails if it did not), so it
cannot pass without testing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: A fixed seed: the same fault schedule and workload on every run.
SEED = 20260501
USD = 1_000_000


@pytest.mark.acceptance
@pytest.mark.timeout(240)
def test_short_chaos_run_loses_nothing_and_charges_nothing_twice(services, tmp_path):
    result_path = tmp_path / "chaos.json"
    env = {
        **{k: v for k, v in os.environ.items() if k != "BILLING_REDIS_URL"},
        "BILLING_DATABASE_URL": services.database_url,
        "CHAOS_SECONDS": "30",
        "CHAOS_MESSAGES": "3000",
        "CHAOS_POISON": "2",
        "CHAOS_SEED": str(SEED),
        "CHAOS_DRAIN_TIMEOUT_S": "120",
    }
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "harness.chaos", "--json", str(result_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
    )
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert result_path.exists(), output[-6000:]
    result = json.loads(result_path.read_text())
    # nothing left behind: no worker, scheduler, producer or redis-server of the run is still running
    assert _processes_of_run(result["run"]) == []
    assert proc.returncode == 0, output[-6000:]
    assert f"seed {SEED}" in output
    assert "every check passed" in output
    # the three numbers
    assert (result["double_charges"], result["lost_effects"], result["unpaid_entitled_periods"]) == (0, 0, 0)
    assert result["promise"]["counts"] and not any(result["promise"]["counts"].values())
    assert result["audit_ok"]
    assert all(result["checks"].values()), result["checks"]
    # the table says so too
    table = {row[0]: row[1] for row in result["rows"]}
    assert table["double charges"].startswith("0 ")
    assert table["lost effects"].startswith("0 ")
    assert table["unpaid entitled periods"].startswith("0 ")
    # the load and the faults were what the run claims
    assert result["published"] >= 3000
    assert result["repeated_publishes"] >= 0.10 * result["published"]
    faults = result["faults"]
    assert faults["worker SIGKILL"] >= 5
    assert faults["pg_terminate_backend passes"] >= 2
    if "fakeredis" not in result["redis"]:
        assert faults["Redis restart"] == 1  # also a check of the run ("Redis restarted")
    assert faults["clock jump"] == 3
    assert faults["payments workers stopped"] == 1
    # renewals waited for their top-ups through more re-sends (the runner's) than the delivery
    # limit allows deliveries, and every one of them finished
    outage = result["outage"]
    assert outage["waiting_renewals"] >= 1 and outage["resends"] > 8, outage
    # (completed; or forgotten, None, when the resumed renewal was asked before its period began)
    assert set(outage["keys_at_end"].values()) <= {"completed", None}, outage
    # the new provider behaviours were met: top-ups on each of them
    for card in ("pm_never_answers", "pm_silent_charge", "pm_processing", "pm_processing_fail"):
        assert faults[f"top-ups on {card}"] >= 1, (card, faults)
    # the owners were driven past the key lease, the top-up deadline and the grace period
    assert sum(result["clock"]["drive_jumps"]) >= 3 * 86_400
    # poison messages: each killed its worker a bounded number of times, then was dead-lettered
    assert result["poison"] == {"published": 2, "dead": 2}
    # (other keys may have failure rows too, e.g. a top-up whose retries ran out before the reconciler
    # settled it: the oracle above judges their end state, not their rows)
    assert result["dead_lettered"]["too_many_deliveries"] >= 2
    assert 2 <= result["worker_exits"].get("poison", 0) <= 2 * 8
    assert (
        not result["dramatiq_bugs"]["retries_not_enqueued"]
        and not result["dramatiq_bugs"]["stranded_delayed"]
    )
    print(f"short chaos run: {elapsed:.1f} s")


def _processes_of_run(run: str) -> list[str]:
    """Processes whose command line (redis-server, producers) or environment (workers) names the run."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"billing-chaos-{run}".encode() in cmdline or f"billing_chaos_{run}".encode() in environ:
            found.append(proc.name + ": " + cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def _start(tmp_path: Path, **extra_env: str) -> tuple[Any, subprocess.Popen[bytes], Any]:
    """Our own redis-server and one worker process (1 thread) on it; returns (server, worker, log file)."""
    from harness.services import RedisServer

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server: these reproductions restart a real Redis")
    server = RedisServer(binary, tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    (tmp_path / "logs").mkdir()
    server.start()
    log = (tmp_path / "logs" / "worker-1.log").open("wb")
    env = {
        **os.environ,
        "BILLING_REDIS_URL": server.url,
        "BILLING_MAX_RETRIES": "1",
        "BILLING_HEARTBEAT_TIMEOUT_MS": "10000",  # the worker is not taken for dead during the outage
        "BILLING_MAINTENANCE_INTERVAL_MS": "300",
        "BILLING_METRICS_ENABLED": "false",
        "BILLING_LOG_FORMAT": "json",
        "BILLING_LOG_LEVEL": "INFO",
        "dramatiq_worker_timeout": "200",
        "dramatiq_restart_delay": "500",
        **extra_env,
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "workers.actors", "--processes", "1", "--threads", "1"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return server, worker, log


def _stop(server: Any, worker: subprocess.Popen[bytes], log: Any) -> None:
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    log.close()
    server.stop()


_ERRING_CARD = {
    "account_id": "a1",
    "balance_micros": 0,
    "auto_top_up_threshold_micros": 10 * USD,
    "auto_top_up_amount_micros": 20 * USD,
    "payment_method_ref": "pm_error_always",  # the fake provider fails before charging: a transient error
}
_TERMINAL = (
    "SELECT 1 FROM idempotency_keys k WHERE key = 'outage' AND (status = 'completed' "
    "OR EXISTS (SELECT 1 FROM failed_messages f WHERE f.idempotency_key = k.key))"
)


@pytest.mark.acceptance
@pytest.mark.timeout(120)
def test_a_message_failing_transiently_while_redis_is_down_is_retried_or_recorded(
    services, setup, db, tmp_path
):
    """Regression test of a Dramatiq bug found by chaos (Bogdanp/dramatiq PR #545).

    With Redis down, the Retries middleware could not enqueue the retry, only
    logged it, and the worker acked the message: no retry, no record.
    ``BillingRedisBroker.enqueue`` now waits for Redis, as Dramatiq's acks do.
    """
    from harness.chaos import retries_not_enqueued
    from tasks.producer import Producer

    setup(accounts=[_ERRING_CARD])
    # the provider call takes 2 s and then fails: its retry is enqueued while Redis is down
    server, worker, log = _start(tmp_path, BILLING_FAKE_LATENCY_MS="2000")
    try:
        message_id = Producer(server.url).auto_top_up(
            account_id="a1", idempotency_key="outage", amount_micros=20 * USD
        )
        _wait(lambda: db("SELECT 1 FROM idempotency_keys WHERE key = 'outage'"), 60, "the claim")
        down_at = time.time()
        if not server.restart(outage_s=3.0):
            raise RuntimeError("Redis lost its data")
        up_at = time.time()
        # the restart must hit its window: the provider call failed (and its retry was enqueued)
        # while Redis was down; otherwise this test tested nothing, and fails
        _wait(lambda: _events(tmp_path / "logs", "transient_error"), 10, "the transient error")
        failed_at = _events(tmp_path / "logs", "transient_error")[0]
        assert down_at < failed_at < up_at, (
            f"the Redis restart missed its window: the provider call failed at {failed_at:.2f}, "
            f"Redis was down from {down_at:.2f} to {up_at:.2f}"
        )
        if _wait(lambda: db(_TERMINAL), 8):
            return  # fixed: retried to the end and recorded for operators
        log.flush()
        if message_id not in retries_not_enqueued(tmp_path / "logs"):
            raise RuntimeError(
                "the message was not finished, but not for the known reason"
            )  # fails, not xfail
        raise AssertionError(f"message {message_id}: retry not enqueued while Redis was down, then acked")
    finally:
        _stop(server, worker, log)


@pytest.mark.acceptance
@pytest.mark.timeout(120)
def test_a_retry_waiting_for_its_backoff_survives_a_redis_restart(services, setup, db, tmp_path):
    """Regression test of a Dramatiq bug found by chaos (Bogdanp/dramatiq issue #527).

    A retry held in a worker's memory until its eta was dropped on a Redis
    connection error but stayed in that worker's acknowledgement set, so it
    was not delivered again while the worker lived.  ``_BillingConsumer``
    (``workers/broker.py``) now requeues it once Redis answers.
    """
    import redis

    from harness.chaos import stranded_delayed
    from tasks.producer import Producer

    setup(accounts=[_ERRING_CARD])
    # the first delivery fails at once; its retry waits 4 s in the worker's delay queue
    server, worker, log = _start(tmp_path, BILLING_MIN_BACKOFF_MS="4000", BILLING_MAX_BACKOFF_MS="4000")
    client = redis.Redis.from_url(server.url)
    try:
        message_id = Producer(server.url).auto_top_up(
            account_id="a1", idempotency_key="outage", amount_micros=20 * USD
        )
        _wait(
            lambda: any(client.scard(k) for k in client.scan_iter("dramatiq:__acks__.*.billing.payments.DQ")),
            60,
            "the retry to be held by the worker's delay queue",
        )
        # the restart must hit its window: the retry still waits for its eta when Redis goes down
        # (otherwise it would run before the restart and this test would test nothing, and it fails)
        etas = _delayed_etas(client)
        down_at_ms = time.time() * 1000
        assert etas and min(etas) > down_at_ms + 500, (
            f"the Redis restart missed its window: retry eta {etas}, Redis going down at {down_at_ms:.0f}"
        )
        assert not db(_TERMINAL)
        if not server.restart(outage_s=1.0):
            raise RuntimeError("Redis lost its data")
        if _wait(lambda: db(_TERMINAL), 10):
            return  # fixed: the retry ran, failed again and was recorded for operators
        if message_id not in stranded_delayed(client, older_than_ms=2_000):
            raise RuntimeError("the retry did not run, but not for the known reason")  # fails, not xfail
        raise AssertionError(f"message {message_id}: retry stranded in the live worker's acknowledgement set")
    finally:
        client.close()
        _stop(server, worker, log)


def _wait(predicate: Any, timeout_s: float, what: str | None = None) -> bool:
    """Poll ``predicate`` until true; on timeout, raise (``what`` given) or return False."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            if what is not None:
                raise RuntimeError(f"timed out waiting for {what}")
            return False
        time.sleep(0.1)
    return True


def _events(logs: Path, name: str) -> list[float]:
    """Wall times (epoch seconds) of the workers' JSON log lines for event ``name``, in order."""
    found = []
    for path in sorted(logs.glob("worker-*.log")):
        for raw in path.read_bytes().splitlines():
            if not raw.startswith(b"{"):
                continue
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if event.get("event") == name and "timestamp" in event:
                found.append(datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp())
    return sorted(found)


def _delayed_etas(client: Any) -> list[float]:
    """The etas (epoch ms) of the delayed messages of ``billing.payments`` held by a worker."""
    etas = []
    for ack_key in client.scan_iter("dramatiq:__acks__.*.billing.payments.DQ"):
        for redis_id in client.smembers(ack_key):
            raw = client.hget("dramatiq:billing.payments.DQ.msgs", redis_id)
            if raw is not None:
                etas.append(float(json.loads(raw)["options"]["eta"]))
    return etas
