"""``billing db``, ``billing account``, ``billing plan`` and ``billing subscription``: setting up the money side.

Each command checks its input first (:mod:`workers.cli.common`, exit 2 with
nothing written), then runs one transaction of :mod:`db.money`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

from .common import (
    UsageProblem,
    check_amount,
    check_currency,
    check_id,
    check_top_up_amount,
    database,
    now,
    run_db,
)

__all__ = ["account_app", "db_app", "plan_app", "subscription_app"]


@click.group("db")
def db_app() -> None:
    """Database schema."""


@click.group("account")
def account_app() -> None:
    """Accounts."""


@click.group("plan")
def plan_app() -> None:
    """Plans."""


@click.group("subscription")
def subscription_app() -> None:
    """Subscriptions."""


# --------------------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the newest schema (Alembic to head)."""
    from db.migrate import upgrade

    with database() as url:
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
        run_db(go)
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
    check_id("account id", account_id)
    check_currency(currency)
    check_amount("--balance-micros", balance_micros, minimum=0)
    check_amount("--auto-top-up-threshold-micros", threshold, minimum=0)
    check_amount("--auto-top-up-amount-micros", amount, minimum=1)
    check_amount("--auto-top-up-monthly-cap-micros", monthly_cap, minimum=1)
    if monthly_cap is not None and (amount is None or monthly_cap < amount):
        raise UsageProblem("--auto-top-up-monthly-cap-micros must be at least --auto-top-up-amount-micros")
    given = [v is not None for v in (threshold, amount, payment_method)]
    if any(given) and not all(given):
        raise UsageProblem(
            "auto-top-up needs all of --auto-top-up-threshold-micros, --auto-top-up-amount-micros and --payment-method"
        )
    if payment_method is not None:
        check_id("--payment-method", payment_method)
    if amount is not None:
        check_top_up_amount("--auto-top-up-amount-micros", amount, currency)

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
                now=now(),
            )

    if not run_db(go):
        raise UsageProblem(f"account {account_id!r} already exists")
    click.echo(f"account {account_id} created")


@account_app.command("show")
@click.argument("account_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def account_show(account_id: str, as_json: bool) -> None:
    """Show balance, owed usage, has_credits, subscriptions, keys (never secrets), ledger and usage of an account."""
    check_id("account id", account_id)
    from db.queries import account_snapshot

    snapshot = run_db(lambda engine: account_snapshot(engine, account_id))
    if snapshot is None:
        raise UsageProblem(f"unknown account {account_id!r}")
    if as_json:
        click.echo(json.dumps(snapshot, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    a = snapshot["account"]
    console.print(
        f"[bold]{a['id']}[/bold]  {a['currency']}  balance {a['balance_micros']:,} micros"
        f"  owed {a['owed_micros']:,} micros  has_credits {a['has_credits']}"
    )
    for title, rows in (
        ("subscriptions", snapshot["subscriptions"]),
        ("api keys", snapshot["api_keys"]),
        ("usage by day and meter", snapshot["usage"]),
    ):
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
    check_id("account id", account_id)
    from db import money
    from db.engine import transaction

    async def go(engine: Any) -> Any:
        async with transaction(engine) as conn:
            return await money.create_user_key(conn, account_id=account_id, now=now())

    issued = run_db(go)
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
    check_id("account id", account_id)
    check_amount("--amount-micros", amount, minimum=1)
    check_id("--idempotency-key", idempotency_key)
    from db import money
    from db.engine import transaction

    async def go(engine: Any) -> tuple[bool, int]:
        async with transaction(engine) as conn:
            return await money.credit_account(
                conn, account_id=account_id, amount_micros=amount, idempotency_key=idempotency_key, now=now()
            )

    applied, balance = run_db(go)
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
@click.option(
    "--max-per-month",
    "max_per_month",
    type=click.IntRange(1, 1000),
    default=None,
    help="Top-ups this account may have per calendar month (default: BILLING_TOP_UPS_PER_PERIOD).",
)
@click.option(
    "--default-max-per-month", "default_max", is_flag=True, help="Use BILLING_TOP_UPS_PER_PERIOD again."
)
def account_auto_top_up(
    account_id: str,
    enabled: bool | None,
    threshold: int | None,
    amount: int | None,
    payment_method: str | None,
    monthly_cap: int | None,
    no_cap: bool,
    max_per_month: int | None,
    default_max: bool,
) -> None:
    """Change an account's auto-top-up settings (options not given stay as they are)."""
    check_id("account id", account_id)
    check_amount("--threshold-micros", threshold, minimum=0)
    check_amount("--amount-micros", amount, minimum=1)
    check_amount("--monthly-cap-micros", monthly_cap, minimum=1)
    if payment_method is not None:
        check_id("--payment-method", payment_method)
    if no_cap and monthly_cap is not None:
        raise UsageProblem("--monthly-cap-micros and --no-monthly-cap exclude each other")
    if default_max and max_per_month is not None:
        raise UsageProblem("--max-per-month and --default-max-per-month exclude each other")
    from db import money
    from db.engine import transaction
    from db.errors import SettingRefused

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
                    check_top_up_amount("--amount-micros", amount, currency.strip())
            await money.configure_auto_top_up(
                conn,
                account_id=account_id,
                now=now(),
                enabled=enabled,
                threshold_micros=threshold,
                amount_micros=amount,
                payment_method_ref=payment_method,
                monthly_cap_micros=monthly_cap,
                clear_monthly_cap=no_cap,
                max_per_period=max_per_month,
                clear_max_per_period=default_max,
            )

    try:
        run_db(go)
    except SettingRefused as exc:  # by constraint name, e.g. the monthly cap below the amount
        raise UsageProblem(exc.message) from exc
    click.echo(f"account {account_id} auto-top-up updated")


# --------------------------------------------------------------------------- subscriptions


@subscription_app.command("cancel")
@click.argument("subscription_id", metavar="ID")
@click.option("--undo", is_flag=True, help="Take back a cancel request (the subscription renews again).")
def subscription_cancel(subscription_id: str, undo: bool) -> None:
    """Cancel at period end: the renewal then cancels instead of charging and revokes the managed keys."""
    check_id("subscription id", subscription_id)
    from db import money
    from db.engine import transaction

    async def go(engine: Any) -> dict[str, Any]:
        async with transaction(engine) as conn:
            return await money.set_cancel_at_period_end(
                conn, subscription_id=subscription_id, cancel=not undo, now=now()
            )

    result = run_db(go)
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
    check_id("plan id", plan_id)
    check_currency(currency)
    check_amount("--price-micros", price_micros, minimum=1)
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

    if not run_db(go):
        raise UsageProblem(f"plan {plan_id!r} already exists")
    click.echo(f"plan {plan_id} created")
