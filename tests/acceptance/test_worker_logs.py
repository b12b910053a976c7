"""Real worker processes write one JSON object per line, and one line per failure.

Dramatiq's worker processes send their stderr through a pipe to the parent,
one pipe message per ``write()``; a logger that writes a line's text and its
newline separately lets two processes merge two lines into one.  Here three
processes of two threads each log hundreds of failures at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dramatiq
from dramatiq.brokers.redis import RedisBroker

ROOT = Path(__file__).resolve().parent.parent.parent
#: Lines of Dramatiq's parent process (it never imports our logging set-up): "[...] [dramatiq.MainProcess] ..."
PARENT = "[dramatiq.MainProcess]"


def test_three_worker_processes_write_one_json_object_per_line_and_one_line_per_failure(
    services, db, tmp_path
):
    n = 400
    env = {
        **os.environ,
        "BILLING_REDIS_URL": services.redis_db(1),
        "BILLING_METRICS_ENABLED": "false",
        "BILLING_LOG_FORMAT": "json",
        "BILLING_LOG_LEVEL": "INFO",
    }
    stderr = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "workers.actors", "--processes", "3", "--threads", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        broker = RedisBroker(url=services.redis_db(1))
        # unknown accounts: each one a permanent failure, recorded and logged as message_failed
        for i in range(n):
            broker.enqueue(
                dramatiq.Message(
                    queue_name="billing",
                    actor_name="subscribe",
                    args=(),
                    kwargs={"account_id": f"nobody-{i}", "plan_id": "pro", "idempotency_key": f"k{i}"},
                    options={},
                )
            )
        deadline = time.monotonic() + 120
        while db("SELECT count(*) AS n FROM failed_messages")[0]["n"] < n:
            assert proc.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, "the failures were not all recorded"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        stderr.close()
    lines = (tmp_path / "worker.log").read_text().splitlines()
    events = []
    for line in lines:
        if PARENT in line:
            continue
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not one JSON object: {line[:300]!r}") from None
    assert all(isinstance(e, dict) for e in events)
    failed = [e for e in events if e.get("event") == "message_failed"]
    assert len(failed) == n
    assert {e["error"] for e in failed} == {"unknown_account"}
    assert len({e["message_id"] for e in failed}) == n
    # nothing else about these failures: no Dramatiq traceback, no "Aborting message"
    assert not [e for e in events if "exception" in e or "Traceback" in str(e.get("event"))]
    assert not [e for e in events if str(e.get("event", "")).startswith(("Aborting", "Failed to process"))]
