"""Figures of a chaos run, from the workers' logs and the database: events, outcomes, soak windows.

Also the traces of two Dramatiq bugs around a Redis restart
(:func:`retries_not_enqueued`; the stranded retries are found while
draining, :func:`harness.chaos.drive.stranded_delayed`).
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from harness.figures import describe_machine, percentile

from .config import RunState
from .pool import Database, RedisInfo, pg_connect


def log_counts(logs: Path) -> tuple[Counter[str], Counter[str], Counter[str], Counter[str]]:
    """Events of the workers' JSON logs, transient errors by type, Dramatiq's own warnings, and the
    deliveries of each idempotency key that found it waiting for funds (``waiting_for_funds`` lines)."""
    events: Counter[str] = Counter()
    transient: Counter[str] = Counter()
    waiting: Counter[str] = Counter()
    dramatiq_lines: Counter[str] = Counter()
    needles = {
        "Consumer encountered a connection error": "consumer connection errors",
        "Failed to post_process_message": "acks retried after a connection error",
        "Found 'None' message": "ids without a body (requeued, then acked)",
    }
    for path in sorted(logs.glob("worker-*.log")):
        with path.open("rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace")
                if line.startswith("{"):
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by SIGKILL
                    name = event.get("event")
                    if isinstance(name, str):
                        events[name] += 1
                        if name == "transient_error":
                            transient[str(event.get("error"))] += 1
                        elif name == "waiting_for_funds":
                            waiting[str(event.get("idempotency_key"))] += 1
                    continue
                for needle, label in needles.items():
                    if needle in line:
                        dramatiq_lines[label] += 1
    return events, transient, dramatiq_lines, waiting


_RETRYING = re.compile(
    r"\[PID (\d+)\] \[([^\]]+)\] \[dramatiq\.middleware\.retries\.Retries\] \[INFO\] Retrying message '([^']+)'"
)
_RETRY_NOT_ENQUEUED = re.compile(
    r"\[PID (\d+)\] \[([^\]]+)\] \[[^\]]+\] \[CRITICAL\] Unexpected failure in after_process_message of "
    r"<dramatiq\.middleware\.retries\.Retries"
)


def retries_not_enqueued(logs: Path) -> set[str]:
    """Message ids whose retry Dramatiq could not enqueue (Redis unreachable) and then acked: lost.

    Dramatiq's ``Retries`` middleware enqueues the retry in
    ``after_process_message``; the broker logs an exception there as
    "Unexpected failure in after_process_message" and goes on, and the
    worker then acknowledges the original message (retrying the ack until
    Redis is back).  Upstream: Bogdanp/dramatiq PR #545.  Found in the
    workers' logs: a "Retrying message 'ID'" line followed, on the same
    process and thread, by that failure.
    """
    lost: set[str] = set()
    for path in sorted(logs.glob("worker-*.log")):
        retrying: dict[tuple[str, str], str] = {}
        with path.open("rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace")
                if (m := _RETRYING.search(line)) is not None:
                    retrying[(m[1], m[2])] = m[3]
                elif (m := _RETRY_NOT_ENQUEUED.search(line)) is not None and (m[1], m[2]) in retrying:
                    lost.add(retrying.pop((m[1], m[2])))
    return lost


async def db_figures(url: str) -> dict[str, Any]:
    """The run's end state from PostgreSQL: keys, failures, outcomes, ledger, charges, top-ups, hot accounts."""
    conn = await pg_connect(url)
    try:

        async def rows(sql: str) -> list[dict[str, Any]]:
            return [dict(r) for r in await conn.fetch(sql)]

        return {
            "keys": {r["key"]: r["status"] for r in await rows("SELECT key, status FROM idempotency_keys")},
            # the last delivery's message id, and the account (renew and revoke_key name it in their outcome)
            "key_info": {
                r["key"]: (r["message_id"], r["account_id"])
                for r in await rows(
                    "SELECT key, message_id, COALESCE(account_id, result->>'account_id') AS account_id "
                    "FROM idempotency_keys"
                )
            },
            "failed": await rows(
                "SELECT idempotency_key, error_type, status, actor_name FROM failed_messages"
            ),
            "completed_at": {
                r["key"]: r["ms"]
                for r in await rows(
                    "SELECT key, (extract(epoch FROM completed_at) * 1000)::bigint AS ms FROM idempotency_keys "
                    "WHERE completed_at IS NOT NULL"
                )
            },
            "outcomes": await rows(
                "SELECT kind, COALESCE(result->>'outcome', status) AS outcome, count(*) AS n FROM idempotency_keys "
                "GROUP BY 1, 2 ORDER BY 1, 2"
            ),
            "ledger": await rows(
                "SELECT kind, count(*) AS n, sum(amount_micros)::bigint AS total FROM ledger_entries GROUP BY 1 ORDER BY 1"
            ),
            "charges": await rows(
                "SELECT status, count(*) AS n, sum(calls) AS calls FROM fake_provider_charges GROUP BY 1 ORDER BY 1"
            ),
            "top_ups": await rows("SELECT status, count(*) AS n FROM top_up_attempts GROUP BY 1 ORDER BY 1"),
            "cards": await rows(
                "SELECT payment_method_ref AS card, count(*) AS n FROM top_up_attempts GROUP BY 1 ORDER BY 1"
            ),
            "subscriptions": await rows(
                "SELECT status, count(*) AS n FROM subscriptions GROUP BY 1 ORDER BY 1"
            ),
            "usage": (
                await rows(
                    "SELECT count(*) AS events, COUNT(DISTINCT account_id) AS accounts, "
                    "COALESCE(sum(amount_micros), 0)::bigint AS amount, "
                    "COALESCE(sum(owed_micros), 0)::bigint AS owed_at_record, "
                    "(SELECT COALESCE(sum(owed_micros), 0)::bigint FROM accounts) AS owed_now, "
                    "(SELECT count(*) FROM ledger_entries WHERE kind = 'usage_charge') AS entries "
                    "FROM usage_events"
                )
            )[0],
            # renew and revoke_key name their account in the outcome, not in the message
            "hot": await rows(
                "SELECT COALESCE(account_id, result->>'account_id') AS account_id, count(*) AS n "
                "FROM idempotency_keys WHERE COALESCE(account_id, result->>'account_id') IS NOT NULL "
                "GROUP BY 1 ORDER BY 2 DESC LIMIT 10"
            ),
            "with_account": int(
                await conn.fetchval(
                    "SELECT count(*) FROM idempotency_keys WHERE COALESCE(account_id, result->>'account_id') IS NOT NULL"
                )
            ),
        }
    finally:
        await conn.close()


def soak_windows(
    records: list[dict[str, Any]], completed_at: dict[str, int], state: RunState, seconds: float
) -> list[dict[str, Any]]:
    """Latency (first publish of a key to its commit) and worker RSS per time window of the soak."""
    n = max(3, min(10, int(seconds // 10)))
    width = seconds / n
    first: dict[str, int] = {}
    for r in records:
        first.setdefault(r["k"], r["t"])
    windows: list[dict[str, Any]] = []
    for i in range(n):
        lo, hi = i * width, (i + 1) * width
        lat = [
            (completed_at[k] - t) / 1000
            for k, t in first.items()
            if k in completed_at and lo <= (t - state.soak_start_ms) / 1000 < hi
        ]
        rss = [kib for at, kib in state.rss_samples if lo <= at < hi]
        backlog = [b for at, b in state.backlog_samples if lo <= at < hi]
        windows.append(
            {
                "window": f"{lo:.0f}-{hi:.0f} s",
                "messages": len(lat),
                "p50_ms": percentile(lat, 0.5) * 1000,
                "p99_ms": percentile(lat, 0.99) * 1000,
                "rss_mib": (sum(rss) / len(rss) / 1024) if rss else float("nan"),
                "backlog_max": max(backlog) if backlog else 0,
            }
        )
    return windows


def soak_verdict(windows: list[dict[str, Any]]) -> tuple[bool, bool]:
    """(latency flat, memory flat): the last third of the run against the first.

    A trend, not one window: latency is flat when the median over the last
    third's windows of their p50 is at most twice the first third's + 10 ms,
    and the same for p99 with + 50 ms (one window's p99 on a busy two-core
    machine jumps with any stall; a leak or a growing backlog moves the whole
    third).  Memory is flat when the last window's RSS is at most 10% + 5 MiB
    above the first's.
    """
    third = max(1, len(windows) // 3)
    first, last = windows[:third], windows[-third:]

    def median(rows: list[dict[str, Any]], field: str) -> float:
        return float(statistics.median(r[field] for r in rows))

    latency = (
        median(last, "p50_ms") <= 2 * median(first, "p50_ms") + 10
        and median(last, "p99_ms") <= 2 * median(first, "p99_ms") + 50
    )
    memory = windows[-1]["rss_mib"] <= 1.10 * windows[0]["rss_mib"] + 5
    return latency, memory


def machine(db: Database, rds: RedisInfo) -> dict[str, str]:
    """The machine of the run, with its PostgreSQL and Redis."""
    return describe_machine(postgresql=f"{db.version} ({db.label})", redis=f"{rds.version} ({rds.label})")
