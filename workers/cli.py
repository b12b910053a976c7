"""The ``billing`` console script (Click).

Every error prints one line on stderr (``billing: error: ...``), never a
traceback, and exits non-zero: 2 for bad input (a malformed option, an
unknown id, an idempotency conflict: nothing was written), 1 for a
dependency that is down or misconfigured (PostgreSQL, Redis, settings).
:func:`main` is the one place that translates errors
(:func:`workers.dependencies.dependency_error`,
:attr:`tasks.errors.BillingError.exit_code`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from tasks.errors import ConfigurationError
from tasks.messages import MAX_AMOUNT_MICROS, renewal_key, validate_message

from .dependencies import dependency_error, one_line

__all__ = ["app", "main"]


@click.group(name="billing", context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """Idempotent prepaid-credit billing on Dramatiq (Redis) and PostgreSQL."""


@app.group("db")
def db_app() -> None:
    """Database schema."""


@app.group("account")
def account_app() -> None:
    """Accounts."""


@app.group("plan")
def plan_app() -> None:
    """Plans."""


@app.group("subscription")
def subscription_app() -> None:
    """Subscriptions."""


@app.group("publish")
def publish_app() -> None:
    """Publish a billing message (the producer API from a shell)."""


#: Where ``billing`` keeps its embedded PostgreSQL when BILLING_DATABASE_URL is unset.
LOCAL_DATA_DIR = Path(os.environ.get("BILLING_LOCAL_DIR", ".billing"))

_ID = re.compile(r"^[^\s]{1,255}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")


class UsageProblem(click.UsageError):
    """Bad input on the command line."""


def _check_id(what: str, value: str) -> str:
    if not _ID.match(value) or not value.isprintable():
        raise UsageProblem(f"{what} must be 1 to 255 printable characters without whitespace")
    return value


def _check_currency(value: str) -> str:
    if not _CURRENCY.match(value):
        raise UsageProblem(f"currency must be a 3-letter ISO 4217 code in capitals (got {value!r})")
    return value


def _check_amount(what: str, value: int | None, *, minimum: int) -> int | None:
    if value is not None and not (minimum <= value <= MAX_AMOUNT_MICROS):
        raise UsageProblem(f"{what} must be an integer between {minimum} and {MAX_AMOUNT_MICROS} micros")
    return value


def _check_top_up_amount(option: str, amount: int, currency: str) -> None:
    """Refuse a top-up amount the configured provider could never charge in ``currency`` (bad input, exit 2).

    The rule is the provider's (:meth:`workers.providers.base.PaymentProvider.check_amount`;
    Stripe: whole minor units, :func:`workers.providers.stripe.to_minor_units`).
    """
    from tasks.errors import ProviderRejected

    from .providers import provider_class
    from .settings import get_settings

    try:
        provider_class(get_settings().payment_provider).check_amount(amount, currency)
    except ProviderRejected as exc:
        raise UsageProblem(f"{option}: {exc.message}") from exc


@contextmanager
def _database() -> Iterator[str]:
    from db.config import database_url

    url = database_url()
    if url:
        yield url
        return
    from .local import embedded_postgres

    with embedded_postgres(LOCAL_DATA_DIR / "pgdata") as embedded:
        yield embedded


def _run_db(fn: Any) -> Any:
    """Run ``await fn(engine)`` on the configured (or local embedded) database."""
    from db.engine import make_engine

    with _database() as url:

        async def go() -> Any:
            engine = make_engine(url, pool_size=2)
            try:
                return await fn(engine)
            finally:
                await engine.dispose()

        # driver errors (no such database, no schema yet, server down...) reach
        # main(), which says what they mean in one line
        return asyncio.run(go())


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the newest schema (Alembic to head)."""
    from db.migrate import upgrade

    with _database() as url:
        upgrade(url)
    click.echo("database at head")


@db_app.command("grant")
@click.argument("role")
@click.option(
    "--password-env",
    "password_env",
    default=None,
    help="Name of an environment variable holding the role's password (never on the command line).",
)
def db_grant(role: str, password_env: str | None) -> None:
    """Create (if missing) the workers' role and give it exactly what the money path needs.

    Run as the owner of the schema (the role migrations run as), after each
    migration.  The role may INSERT ledger rows but never UPDATE or DELETE
    them, and cannot change the schema.
    """
    from db.engine import transaction
    from db.roles import grant_worker_role

    password = None
    if password_env is not None:
        password = os.environ.get(password_env)
        if not password:
            raise UsageProblem(f"environment variable {password_env} is not set")

    async def go(engine: Any) -> None:
        async with transaction(engine) as conn:
            await grant_worker_role(conn, role, password=password)

    try:
        _run_db(go)
    except ValueError as exc:
        raise UsageProblem(str(exc)) from exc
    click.echo(f"role {role} granted the worker privileges")


# --------------------------------------------------------------------------- accounts


@account_app.command("create")
@click.argument("account_id", metavar="ID")
@click.option("--currency", "currency", type=str, required=True, help="ISO 4217 code, e.g. USD.")
@click.option(
    "--balance-micros",
    "balance_micros",
    type=int,
    default=0,
    show_default=True,
    help="Opening balance in micros (>= 0).",
)
@click.option(
    "--auto-top-up-threshold-micros", "threshold", type=int, default=None, help="Top up below this balance."
)
@click.option("--auto-top-up-amount-micros", "amount", type=int, default=None, help="Amount of each top-up.")
@click.option("--payment-method", "payment_method", type=str, default=None, help="Payment method reference.")
@click.option(
    "--auto-top-up-monthly-cap-micros",
    "monthly_cap",
    type=int,
    default=None,
    help="Most that auto-top-ups may add in one calendar month (UTC).",
)
def account_create(
    account_id: str,
    currency: str,
    balance_micros: int,
    threshold: int | None,
    amount: int | None,
    payment_method: str | None,
    monthly_cap: int | None,
) -> None:
    """Open an account (auto-top-up is on when threshold, amount and payment method are all given)."""
    _check_id("account id", account_id)
    _check_currency(currency)
    _check_amount("--balance-micros", balance_micros, minimum=0)
    _check_amount("--auto-top-up-threshold-micros", threshold, minimum=0)
    _check_amount("--auto-top-up-amount-micros", amount, minimum=1)
    _check_amount("--auto-top-up-monthly-cap-micros", monthly_cap, minimum=1)
    if monthly_cap is not None and (amount is None or monthly_cap < amount):
        raise UsageProblem("--auto-top-up-monthly-cap-micros must be at least --auto-top-up-amount-micros")
    given = [v is not None for v in (threshold, amount, payment_method)]
    if any(given) and not all(given):
        raise UsageProblem(
            "auto-top-up needs all of --auto-top-up-threshold-micros, --auto-top-up-amount-micros and --payment-method"
        )
    if payment_method is not None:
        _check_id("--payment-method", payment_method)
    if amount is not None:
        _check_top_up_amount("--auto-top-up-amount-micros", amount, currency)

    from db import money
    from db.engine import transaction

    async def go(engine: Any) -> bool:
        async with transaction(engine) as conn:
            return await money.create_account(
                conn,
                account_id=account_id,
                currency=currency,
                balance_micros=balance_micros,
                auto_top_up_threshold_micros=threshold,
                auto_top_up_amount_micros=amount,
                payment_method_ref=payment_method,
                auto_top_up_monthly_cap_micros=monthly_cap,
                now=_now(),
            )

    if not _run_db(go):
        raise UsageProblem(f"account {account_id!r} already exists")
    click.echo(f"account {account_id} created")


@account_app.command("show")
@click.argument("account_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def account_show(account_id: str, as_json: bool) -> None:
    """Show balance, subscriptions, keys (never secrets) and ledger of an account."""
    _check_id("account id", account_id)
    from db.queries import account_snapshot

    snapshot = _run_db(lambda engine: account_snapshot(engine, account_id))
    if snapshot is None:
        raise UsageProblem(f"unknown account {account_id!r}")
    if as_json:
        click.echo(json.dumps(snapshot, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    a = snapshot["account"]
    console.print(f"[bold]{a['id']}[/bold]  {a['currency']}  balance {a['balance_micros']:,} micros")
    for title, rows in (("subscriptions", snapshot["subscriptions"]), ("api keys", snapshot["api_keys"])):
        table = Table(title=title)
        if rows:
            for col in rows[0]:
                table.add_column(col)
            for r in rows:
                table.add_row(*(str(v) for v in r.values()))
        console.print(table)
    ledger = Table(title="ledger")
    for col in ("id", "amount_micros", "kind", "subscription_id", "idempotency_key", "created_at"):
        ledger.add_column(col)
    for e in snapshot["ledger"]:
        ledger.add_row(
            *(
                str(e[c])
                for c in ("id", "amount_micros", "kind", "subscription_id", "idempotency_key", "created_at")
            )
        )
    console.print(ledger)


@account_app.command("add-user-key")
@click.argument("account_id", metavar="ID")
def account_add_user_key(account_id: str) -> None:
    """Issue a user-owned API key (source=user; billing flows never revoke it).

    The plaintext is printed once, here, and never stored.
    """
    _check_id("account id", account_id)
    from db import money
    from db.engine import transaction

    async def go(engine: Any) -> Any:
        async with transaction(engine) as conn:
            return await money.create_user_key(conn, account_id=account_id, now=_now())

    issued = _run_db(go)
    click.echo(json.dumps({"key_id": issued.key_id, "prefix": issued.prefix, "api_key": issued.plaintext}))


@account_app.command("credit")
@click.argument("account_id", metavar="ID")
@click.option("--amount-micros", "amount", type=int, required=True, help="Amount to credit, in micros (> 0).")
@click.option(
    "--idempotency-key",
    "idempotency_key",
    type=str,
    required=True,
    help="The payment's reference; a repeat credits nothing.",
)
def account_credit(account_id: str, amount: int, idempotency_key: str) -> None:
    """Credit a payment received outside the provider (an ``adjustment`` ledger entry, idempotent by key)."""
    _check_id("account id", account_id)
    _check_amount("--amount-micros", amount, minimum=1)
    _check_id("--idempotency-key", idempotency_key)
    from db import money
    from db.engine import transaction

    async def go(engine: Any) -> tuple[bool, int]:
        async with transaction(engine) as conn:
            return await money.credit_account(
                conn, account_id=account_id, amount_micros=amount, idempotency_key=idempotency_key, now=_now()
            )

    applied, balance = _run_db(go)
    state = "credited" if applied else "already credited (same key), nothing changed"
    click.echo(f"account {account_id} {state}; balance {balance:,} micros")


@account_app.command("auto-top-up")
@click.argument("account_id", metavar="ID")
@click.option(
    "--enable/--disable", "enabled", default=None, help="Switch auto-top-up on (resets declines) or off."
)
@click.option("--threshold-micros", "threshold", type=int, default=None, help="Top up below this balance.")
@click.option("--amount-micros", "amount", type=int, default=None, help="Amount of each top-up.")
@click.option("--payment-method", "payment_method", type=str, default=None, help="Payment method reference.")
@click.option("--monthly-cap-micros", "monthly_cap", type=int, default=None, help="Most per calendar month.")
@click.option("--no-monthly-cap", "no_cap", is_flag=True, help="Remove the monthly cap.")
def account_auto_top_up(
    account_id: str,
    enabled: bool | None,
    threshold: int | None,
    amount: int | None,
    payment_method: str | None,
    monthly_cap: int | None,
    no_cap: bool,
) -> None:
    """Change an account's auto-top-up settings (options not given stay as they are)."""
    _check_id("account id", account_id)
    _check_amount("--threshold-micros", threshold, minimum=0)
    _check_amount("--amount-micros", amount, minimum=1)
    _check_amount("--monthly-cap-micros", monthly_cap, minimum=1)
    if payment_method is not None:
        _check_id("--payment-method", payment_method)
    if no_cap and monthly_cap is not None:
        raise UsageProblem("--monthly-cap-micros and --no-monthly-cap exclude each other")
    from sqlalchemy.exc import IntegrityError

    from db import money
    from db.engine import transaction

    async def go(engine: Any) -> None:
        async with transaction(engine) as conn:
            if amount is not None:
                from sqlalchemy import text

                currency = (
                    await conn.execute(
                        text("SELECT currency FROM accounts WHERE id = :id"), {"id": account_id}
                    )
                ).scalar_one_or_none()
                if currency is not None:  # an unknown account is configure_auto_top_up's error
                    _check_top_up_amount("--amount-micros", amount, currency.strip())
            await money.configure_auto_top_up(
                conn,
                account_id=account_id,
                now=_now(),
                enabled=enabled,
                threshold_micros=threshold,
                amount_micros=amount,
                payment_method_ref=payment_method,
                monthly_cap_micros=monthly_cap,
                clear_monthly_cap=no_cap,
            )

    try:
        _run_db(go)
    except IntegrityError as exc:
        if "accounts_top_up_cap_covers_amount" in str(exc):
            raise UsageProblem("the monthly cap must be at least the top-up amount") from exc
        raise UsageProblem(
            "auto-top-up needs a threshold, an amount and a payment method before it can be enabled"
        ) from exc
    click.echo(f"account {account_id} auto-top-up updated")


# --------------------------------------------------------------------------- subscriptions


@subscription_app.command("cancel")
@click.argument("subscription_id", metavar="ID")
@click.option("--undo", is_flag=True, help="Take back a cancel request (the subscription renews again).")
def subscription_cancel(subscription_id: str, undo: bool) -> None:
    """Cancel at period end: the renewal then cancels instead of charging and revokes the managed keys."""
    _check_id("subscription id", subscription_id)
    from db import money
    from db.engine import transaction

    async def go(engine: Any) -> dict[str, Any]:
        async with transaction(engine) as conn:
            return await money.set_cancel_at_period_end(
                conn, subscription_id=subscription_id, cancel=not undo, now=_now()
            )

    result = _run_db(go)
    if undo:
        click.echo(f"subscription {subscription_id} renews at {result['current_period_end']}")
    else:
        click.echo(f"subscription {subscription_id} ends at {result['current_period_end']}")


# --------------------------------------------------------------------------- plans


@plan_app.command("create")
@click.argument("plan_id", metavar="ID")
@click.option(
    "--price-micros", "price_micros", type=int, required=True, help="Price of one period, in micros (> 0)."
)
@click.option("--currency", "currency", type=str, required=True)
@click.option("--interval", "interval", type=str, required=True, help="month or day.")
@click.option(
    "--interval-count",
    "interval_count",
    type=int,
    default=1,
    show_default=True,
    help="Intervals per period (1..366).",
)
@click.option("--name", "name", type=str, default=None, help="Display name (default: the id).")
def plan_create(
    plan_id: str, price_micros: int, currency: str, interval: str, interval_count: int, name: str | None
) -> None:
    """Create a plan."""
    _check_id("plan id", plan_id)
    _check_currency(currency)
    _check_amount("--price-micros", price_micros, minimum=1)
    if interval not in ("month", "day"):
        raise UsageProblem(f"--interval must be month or day (got {interval!r})")
    if not 1 <= interval_count <= 366:
        raise UsageProblem("--interval-count must be between 1 and 366")
    from db import money
    from db.engine import transaction

    async def go(engine: Any) -> bool:
        async with transaction(engine) as conn:
            return await money.create_plan(
                conn,
                plan_id=plan_id,
                name=name or plan_id,
                price_micros=price_micros,
                currency=currency,
                interval=interval,
                interval_count=interval_count,
            )

    if not _run_db(go):
        raise UsageProblem(f"plan {plan_id!r} already exists")
    click.echo(f"plan {plan_id} created")


# --------------------------------------------------------------------------- publish


def _publish(actor_name: str, kwargs: dict[str, Any]) -> None:
    message = validate_message(actor_name, {k: v for k, v in kwargs.items() if v is not None})
    from tasks.producer import Producer

    message_id = Producer().publish(message)
    click.echo(
        json.dumps(
            {"message_id": message_id, "actor": actor_name, "idempotency_key": message.idempotency_key}
        )
    )


@publish_app.command("subscribe")
@click.option("--account-id", "account_id", type=str, required=True)
@click.option("--plan-id", "plan_id", type=str, required=True)
@click.option("--idempotency-key", "idempotency_key", type=str, required=True)
def publish_subscribe(account_id: str, plan_id: str, idempotency_key: str) -> None:
    """Publish ``subscribe``."""
    _publish("subscribe", {"account_id": account_id, "plan_id": plan_id, "idempotency_key": idempotency_key})


@publish_app.command("renew")
@click.option("--subscription-id", "subscription_id", type=str, required=True)
@click.option(
    "--period-start", "period_start", type=str, required=True, help="ISO 8601 UTC, e.g. 2026-12-01T00:00:00Z."
)
@click.option(
    "--idempotency-key",
    "idempotency_key",
    type=str,
    default=None,
    help="Default: renew:{subscription_id}:{period_start}, the scheduler's key.",
)
def publish_renew(subscription_id: str, period_start: str, idempotency_key: str | None) -> None:
    """Publish ``renew`` for the period starting at ``--period-start``."""
    key = idempotency_key
    if key is None:
        parsed = validate_message(
            "renew",
            {"subscription_id": subscription_id, "period_start": period_start, "idempotency_key": "x"},
        )
        key = renewal_key(subscription_id, parsed.period_start)  # type: ignore[attr-defined]
    _publish(
        "renew", {"subscription_id": subscription_id, "period_start": period_start, "idempotency_key": key}
    )


@publish_app.command("auto-top-up")
@click.option("--account-id", "account_id", type=str, required=True)
@click.option("--idempotency-key", "idempotency_key", type=str, required=True)
@click.option("--amount-micros", "amount_micros", type=int, default=None)
@click.option("--reason", "reason", type=str, default=None)
def publish_auto_top_up(
    account_id: str, idempotency_key: str, amount_micros: int | None, reason: str | None
) -> None:
    """Publish ``auto_top_up``."""
    _publish(
        "auto_top_up",
        {
            "account_id": account_id,
            "idempotency_key": idempotency_key,
            "amount_micros": amount_micros,
            "reason": reason,
        },
    )


@publish_app.command("revoke-key")
@click.option("--reason", "reason", type=str, required=True)
@click.option("--idempotency-key", "idempotency_key", type=str, required=True)
@click.option("--key-id", "key_id", type=str, default=None)
@click.option("--subscription-id", "subscription_id", type=str, default=None)
def publish_revoke_key(
    reason: str, idempotency_key: str, key_id: str | None, subscription_id: str | None
) -> None:
    """Publish ``revoke_key`` for one key or a subscription's managed keys."""
    _publish(
        "revoke_key",
        {
            "key_id": key_id,
            "subscription_id": subscription_id,
            "reason": reason,
            "idempotency_key": idempotency_key,
        },
    )


# --------------------------------------------------------------------------- worker, demo, contract


@app.command("worker")
@click.option(
    "--processes",
    "-p",
    "processes",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Worker processes.",
)
@click.option(
    "--threads",
    "-t",
    "threads",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    help="Threads per process (they mostly wait on PostgreSQL; concurrent renewals share a group commit).",
)
@click.option(
    "--poll-ms",
    "poll_ms",
    type=click.IntRange(10, 10_000),
    default=100,
    show_default=True,
    help="Longest pause of a queue's consumer between two polls (Dramatiq's worker timeout, stock 1000).",
)
@click.option(
    "--shutdown-timeout-ms",
    "shutdown_timeout_ms",
    type=click.IntRange(100, 600_000),
    envvar="BILLING_WORKER_SHUTDOWN_TIMEOUT_MS",
    default=20_000,
    show_default=True,
    help="Time in-flight messages get to finish once stopped; every process exits within it + 5 s.",
)
def worker(processes: int, threads: int, poll_ms: int, shutdown_timeout_ms: int) -> None:
    """Run a Dramatiq worker over the billing actors (queues billing and billing.payments).

    A consumer that finds nothing to fetch (its queue empty, or its
    prefetch full while the threads are busy) backs off exponentially up to
    Dramatiq's worker timeout before it polls again; at the stock 1000 ms a
    message arriving then waits up to a second.  ``--poll-ms`` (100) bounds
    that wait, for the price of a few idle polls a second.

    Stopping: the first SIGTERM/SIGINT (to the main pid or the whole process
    group) lets in-flight messages finish for up to ``--shutdown-timeout-ms``;
    signals within 1 s of it are the same request.  A later signal, or the
    deadline (the timeout + 2 s), ends each worker process at once, leaving
    what is still running unacked for redelivery (``ShutdownDeadline``).
    """
    from .settings import get_settings

    settings = get_settings()
    if not settings.redis_url:
        raise ConfigurationError("BILLING_REDIS_URL is not set; `billing demo` starts its own Redis")
    if not settings.database_url:
        raise ConfigurationError("BILLING_DATABASE_URL is not set; `billing demo` starts its own PostgreSQL")
    argv = [
        sys.executable,
        "-m",
        "dramatiq",
        "workers.actors",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--worker-shutdown-timeout",
        str(shutdown_timeout_ms),
    ]
    env = dict(os.environ)
    # read by workers.actors' ShutdownDeadline in every worker process
    env["BILLING_WORKER_SHUTDOWN_TIMEOUT_MS"] = str(shutdown_timeout_ms)
    # a connection per thread, plus the outbox sweeper's and a renewal batch's
    env.setdefault("BILLING_DB_POOL_SIZE", str(threads + 2))
    env["dramatiq_worker_timeout"] = str(poll_ms)  # read by dramatiq.worker at import
    if settings.metrics_enabled:
        from .metrics import exposition_env

        # Dramatiq's Prometheus middleware reads its directory, host and port from the environment
        try:
            env.update(exposition_env(settings))
        except OSError as exc:
            raise ConfigurationError(f"cannot prepare the metrics directory: {exc}") from exc
    os.execve(sys.executable, argv, env)


@app.command("scheduler")
@click.option("--once", is_flag=True, help="Run one pass and exit.")
@click.option(
    "--interval-ms",
    "interval_ms",
    type=click.IntRange(100, None),
    default=None,
    help="Time between passes (default BILLING_SCHEDULER_INTERVAL_MS, 60000).",
)
@click.option(
    "--lead-time-ms",
    "lead_ms",
    type=click.IntRange(0, None),
    default=None,
    help="Renew periods ending this soon (default BILLING_RENEWAL_LEAD_MS, 0).",
)
@click.option(
    "--progress/--no-progress",
    "progress",
    default=None,
    help="Progress bar (default: when --once runs on a terminal).",
)
def scheduler(once: bool, interval_ms: int | None, lead_ms: int | None, progress: bool | None) -> None:
    """Enqueue due renewals and dunning retries (one scanning scheduler at a time, any number running)."""
    import signal
    from datetime import timedelta

    from db.engine import make_engine

    from .broker import make_broker
    from .logging import configure_logging
    from .scheduler import Scheduler
    from .settings import get_settings

    settings = get_settings()
    if not settings.database_url:
        raise ConfigurationError("BILLING_DATABASE_URL is not set")
    configure_logging(settings.log_format, settings.log_level)
    broker = make_broker(settings)
    show_progress = progress if progress is not None else (once and sys.stdout.isatty())

    database_url = settings.database_url

    async def go() -> Any:
        from .providers import make_provider

        engine = make_engine(database_url, pool_size=2)
        sched = Scheduler(
            engine,
            broker,
            lead_time=timedelta(milliseconds=settings.renewal_lead_ms if lead_ms is None else lead_ms),
            batch_size=settings.scheduler_batch_size,
            policy=settings.billing_policy(),
            # the reconciler asks it about top-ups still pending past their deadline
            provider=make_provider(settings, engine),
        )
        try:
            if once:
                if not show_progress:
                    return await sched.run_pass()
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                with Progress(
                    TextColumn("enqueueing renewals"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
                ) as bar:
                    task = bar.add_task("renewals", total=None)
                    return await sched.run_pass(
                        on_total=lambda n: bar.update(task, total=n),
                        on_batch=lambda n: bar.advance(task, n),
                    )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            interval = timedelta(milliseconds=interval_ms or settings.scheduler_interval_ms)
            await sched.run_forever(interval=interval, stop=stop)
            return None
        finally:
            await engine.dispose()
            broker.close()

    report = asyncio.run(go())
    if report is not None:
        if not report.ran:
            click.echo("another scheduler is scanning; nothing done")
        else:
            click.echo(
                f"enqueued {report.renewals} renewals and {report.retries} dunning retries in {report.seconds:.2f} s"
            )


@app.command("demo")
@click.option(
    "--accounts",
    "accounts",
    type=click.IntRange(10, None),
    default=None,
    help="Accounts to create.  [default: 1000; 200 with --months]",
)
@click.option(
    "--messages",
    "messages",
    type=click.IntRange(100, None),
    default=5000,
    show_default=True,
    help="Messages to publish, at least (not with --months).",
)
@click.option(
    "--processes",
    "-p",
    "processes",
    type=click.IntRange(1, 16),
    default=2,
    show_default=True,
    help="Worker processes (with --months: one in-process worker).",
)
@click.option("--threads", "-t", "threads", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option(
    "--seed", "seed", type=int, default=7, show_default=True, help="Seed of the generated workload."
)
@click.option(
    "--timeout-s",
    "timeout_s",
    type=int,
    default=600,
    show_default=True,
    help="Give up draining after this many seconds (with --months: per simulated day).",
)
@click.option(
    "--months",
    "months",
    type=click.IntRange(1, 120),
    default=None,
    help="Instead: run the renewal scheduler over this many months on an accelerated clock, "
    "one day per step, and print a table per month.",
)
def demo(
    accounts: int | None,
    messages: int,
    processes: int,
    threads: int,
    seed: int,
    timeout_s: int,
    months: int | None,
) -> None:
    """Run the whole system on a generated workload, then audit it (exit 1 if the audit fails)."""
    if months is not None:
        from .demo_months import run_demo_months

        ok = run_demo_months(
            months=months, accounts=accounts or 200, threads=threads, seed=seed, timeout_s=timeout_s
        )
        sys.exit(0 if ok else 1)

    from .demo import run_demo

    ok = run_demo(
        accounts=accounts or 1000,
        messages=messages,
        processes=processes,
        threads=threads,
        seed=seed,
        timeout_s=timeout_s,
    )
    sys.exit(0 if ok else 1)


@app.command("audit")
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--drained",
    is_flag=True,
    help="Also run the checks that hold only with no work in flight (queues and outbox empty).",
)
def audit(as_json: bool, drained: bool) -> None:
    """Check SPEC's invariants (read-only, safe on a live system); exit 1 with the violations."""
    from db.audit import run_audit

    report = _run_db(lambda engine: run_audit(engine, quiescent=drained))
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "violations": report.violations}, indent=2, default=str))
    else:
        for name, rows in report.violations.items():
            click.echo(
                f"{'FAIL' if rows else 'ok  '} {name}: {report.descriptions[name]}"
                + (f" ({len(rows)})" if rows else "")
            )
    sys.exit(0 if report.ok else 1)


@app.command("contract")
def contract() -> None:
    """Print the message contract as JSON Schema (for producers in other languages)."""
    from tasks.schema import contract_schema

    click.echo(json.dumps(contract_schema(), indent=2, sort_keys=True))


def _register_ops() -> None:
    from .operators.cli import ops_app

    app.add_command(ops_app)


_register_ops()


def _register_dashboard() -> None:
    from .operators.dashboard import dashboard_command

    app.add_command(dashboard_command)


_register_dashboard()


def _register_keys() -> None:
    from .keys_cli import register

    register(app)


_register_keys()


def _register_reconcile() -> None:
    from .reconcile import register

    register(app)


_register_reconcile()


def _fail(message: str, code: int) -> NoReturn:
    """Print ``billing: error: {message}`` as one line on stderr and exit with ``code``."""
    print(f"billing: error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``billing`` console script.

    Exit status: 0 on success; 2 for bad input (click's usage errors and
    every :class:`~tasks.errors.PermanentError`); 1 for a dependency that is
    down or misconfigured (:class:`~tasks.errors.TransientError`,
    :class:`~tasks.errors.ConfigurationError`, and the driver errors
    :func:`workers.dependencies.dependency_error` translates) and for an
    unexpected error (``BILLING_DEBUG=1`` re-raises it with its traceback).
    Whatever the error, stderr gets exactly one ``billing: error: ...`` line.
    """
    command = app
    try:
        result = command.main(args=argv, prog_name="billing", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("billing: aborted", file=sys.stderr)
        sys.exit(1)
    except click.ClickException as exc:  # usage errors and bad parameters: bad input
        _fail(exc.format_message(), 2)
    except Exception as exc:  # noqa: BLE001 - every error ends here, as one line
        error = dependency_error(exc)
        if error is None:
            if os.environ.get("BILLING_DEBUG"):
                raise
            _fail(
                f"unexpected {type(exc).__name__}: {exc} (set BILLING_DEBUG=1 to see the traceback)",
                1,
            )
        else:
            _fail(error.message, error.exit_code)
    if isinstance(result, int):
        sys.exit(result)


if __name__ == "__main__":
    main()
