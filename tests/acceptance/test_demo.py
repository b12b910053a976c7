"""``billing demo`` end to end on a small workload: real worker processes, then the audit."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_demo_drains_and_passes_its_audit(services, db):
    env = {**os.environ, "BILLING_REDIS_URL": services.redis_db(2)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "demo",
            "--accounts",
            "40",
            "--messages",
            "300",
            "--processes",
            "1",
            "--threads",
            "4",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "audit passed" in result.stdout
    # the run really moved money: charges happened
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'")[0]["n"] > 0

    # duplicates: every repeat the demo published (a key sent again) is suppressed, unless its key
    # was waiting for funds (a no-op re-send), failed for good (recorded again) or was not kept
    # (a decision deferred, as an early renewal's, is made again); a follow-up the sweeper relays
    # a second time may add a duplicate, so at most the follow-ups more
    published = _count(result.stdout, "messages published")
    repeats = _count(result.stdout, "repeats published (same key)")
    processed = _count(result.stdout, "messages processed (incl. follow-ups)")
    duplicates = _count(result.stdout, "duplicates suppressed")
    waiting = _count(result.stdout, "re-sends of waiting keys (no-ops)")
    (failed,) = db("SELECT count(*) AS n, count(DISTINCT idempotency_key) AS keys FROM failed_messages")
    assert failed["keys"] == _count(result.stdout, "doomed keys published") == 20
    not_kept = _count(result.stdout, "repeats of keys not kept")
    expected = repeats - waiting - (failed["n"] - failed["keys"]) - not_kept
    follow_ups = processed + waiting - published
    assert repeats > 50 and 0 <= follow_ups < 50, result.stdout
    assert expected <= duplicates <= expected + follow_ups, result.stdout


def _count(output: str, label: str) -> int:
    """The value of one row of the demo's summary table (``│ label │ 1,234 │``)."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 2 and cells[0] == label:
            return int(cells[1].replace(",", ""))
    raise AssertionError(f"no row {label!r} in the demo's table:\n{output}")
