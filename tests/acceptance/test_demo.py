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
    assert "duplicates suppressed" in result.stdout
    # the run really moved money: charges and duplicates happened
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'")[0]["n"] > 0
