"""The report of ``billing demo --months N``: a table per calendar month, the end state, the audit.

Every figure is counted from PostgreSQL, over the run's rows only (ids carry
the run id: ``prefix`` is ``<run>-%``).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from dateutil.relativedelta import relativedelta
from rich.console import Console
from rich.table import Table
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["MONTHLY_COLUMNS", "monthly_table", "print_audit", "print_report", "rows", "run_state", "usd"]

USD = 1_000_000

#: The columns of the monthly table: (key, header, meaning).
MONTHLY_COLUMNS = (
    ("subscribed", "new", "first subscriptions charged"),
    ("reactivated", "react.", "reactivations after a cancel (a new subscribe key, charged again)"),
    ("renewed", "renewed", "renewal_charge ledger entries (a dunning retry that paid included)"),
    ("topped_up", "top-ups", "succeeded auto-top-ups"),
    ("declined", "declined", "declined auto-top-ups"),
    ("past_due", "past_due", "subscriptions entering past_due (the first failed renewal of a period)"),
    ("recovered", "recovered", "past_due subscriptions restored to active by a dunning retry that paid"),
    ("canceled_end", "cancel@end", "canceled at period end, at the customer's request"),
    ("canceled_unpaid", "unpaid", "canceled unpaid at the end of grace"),
    ("revoked", "revoked", "managed API keys revoked"),
    ("revenue", "revenue", "subscription and renewal charges"),
)


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[dict[str, Any]]:
    """The rows of one query, as dicts."""
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(text(sql), params)).mappings().all()]


# Every timestamp below is written by the money path from the service's clock
# (the demo's FixedClock), never by the database's now(): ledger_entries.created_at,
# top_up_attempts.created_at, subscriptions.canceled_at, api_keys.revoked_at,
# idempotency_keys.completed_at and the past_due_since of a renew outcome.
_MONTH = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM')"
_MONTHLY_SQL = {
    "subscribed": f"""
        SELECT {_MONTH.format("created_at")} AS month, count(*) AS n FROM ledger_entries
        WHERE account_id LIKE :prefix AND kind = 'subscription_charge'
          AND idempotency_key NOT LIKE '%:resubscribe:%' GROUP BY 1""",
    "reactivated": f"""
        SELECT {_MONTH.format("created_at")} AS month, count(*) AS n FROM ledger_entries
        WHERE account_id LIKE :prefix AND kind = 'subscription_charge'
          AND idempotency_key LIKE '%:resubscribe:%' GROUP BY 1""",
    "renewed": f"""
        SELECT {_MONTH.format("created_at")} AS month, count(*) AS n FROM ledger_entries
        WHERE account_id LIKE :prefix AND kind = 'renewal_charge' GROUP BY 1""",
    "topped_up": f"""
        SELECT {_MONTH.format("created_at")} AS month, count(*) AS n FROM top_up_attempts
        WHERE account_id LIKE :prefix AND status = 'succeeded' GROUP BY 1""",
    "declined": f"""
        SELECT {_MONTH.format("created_at")} AS month, count(*) AS n FROM top_up_attempts
        WHERE account_id LIKE :prefix AND status = 'declined' GROUP BY 1""",
    "past_due": f"""
        SELECT {_MONTH.format("(result->>'past_due_since')::timestamptz")} AS month, count(*) AS n
        FROM idempotency_keys
        WHERE account_id LIKE :prefix AND kind = 'renew' AND status = 'completed'
          AND result->>'outcome' = 'past_due' AND (result->>'dunning_attempts')::int = 0 GROUP BY 1""",
    "recovered": f"""
        SELECT {_MONTH.format("completed_at")} AS month, count(*) AS n FROM idempotency_keys
        WHERE account_id LIKE :prefix AND kind = 'renew' AND status = 'completed'
          AND result->>'outcome' = 'renewed' AND result->>'restored_from' = 'past_due' GROUP BY 1""",
    "canceled_end": f"""
        SELECT {_MONTH.format("canceled_at")} AS month, count(*) AS n FROM subscriptions
        WHERE account_id LIKE :prefix AND cancel_reason = 'canceled_at_period_end' GROUP BY 1""",
    "canceled_unpaid": f"""
        SELECT {_MONTH.format("canceled_at")} AS month, count(*) AS n FROM subscriptions
        WHERE account_id LIKE :prefix AND cancel_reason = 'unpaid_after_grace' GROUP BY 1""",
    "revoked": f"""
        SELECT {_MONTH.format("revoked_at")} AS month, count(*) AS n FROM api_keys
        WHERE account_id LIKE :prefix AND status = 'revoked' GROUP BY 1""",
    "revenue": f"""
        SELECT {_MONTH.format("created_at")} AS month, -sum(amount_micros)::bigint AS n FROM ledger_entries
        WHERE account_id LIKE :prefix AND kind IN ('subscription_charge', 'renewal_charge') GROUP BY 1""",
}


async def monthly_table(
    engine: AsyncEngine, prefix: str, start: datetime, months: int
) -> dict[str, dict[str, int]]:
    """Measure -> month (``YYYY-MM``) -> count, or revenue in micros; every month of the window present."""
    window = {f"{start + relativedelta(months=i):%Y-%m}" for i in range(months)}
    found = {
        key: {r["month"]: int(r["n"]) for r in await rows(engine, sql, prefix=prefix)}
        for key, sql in _MONTHLY_SQL.items()
    }
    # a clock-stamped row outside the window would be a bug: show its month rather than hide it
    labels = sorted(window.union(*(rows.keys() for rows in found.values())))
    table = {key: {m: rows.get(m, 0) for m in labels} for key, rows in found.items()}
    return table


_CLOSING = {
    "statuses": "SELECT status, count(*) AS n FROM subscriptions WHERE account_id LIKE :prefix GROUP BY 1",
    "ledger": """
        SELECT CASE WHEN kind = 'adjustment' AND idempotency_key LIKE 'account-opening:%' THEN 'opening'
                    WHEN kind = 'adjustment' THEN 'payments' ELSE kind END AS kind,
               sum(amount_micros)::bigint AS n
        FROM ledger_entries WHERE account_id LIKE :prefix GROUP BY 1""",
    "balances": "SELECT COALESCE(sum(balance_micros), 0)::bigint AS n FROM accounts WHERE id LIKE :prefix",
    "cap_refused": """
        SELECT count(*) AS n FROM idempotency_keys
        WHERE account_id LIKE :prefix AND kind = 'auto_top_up' AND result->>'outcome' = 'cap_reached'""",
    "self_disabled": """
        SELECT count(*) AS n FROM accounts
        WHERE id LIKE :prefix AND auto_top_up_disabled_reason LIKE 'disabled after%'""",
}


async def run_state(engine: AsyncEngine, prefix: str) -> dict[str, Any]:
    """The run's end state: subscriptions by status, ledger sums by kind (micros), balances, top-up refusals."""
    out: dict[str, Any] = {}
    for name, sql in _CLOSING.items():
        found = await rows(engine, sql, prefix=prefix)
        if name in ("statuses", "ledger"):
            out[name] = {r["status" if name == "statuses" else "kind"]: int(r["n"]) for r in found}
        else:
            out[name] = int(found[0]["n"])
    return out


def usd(micros: int) -> str:
    """Format an amount in micros of USD as ``$1,234.56`` (integer arithmetic, truncated to cents)."""
    sign = "-" if micros < 0 else ""
    cents = abs(micros) // 10_000
    return f"{sign}${cents // 100:,}.{cents % 100:02d}"


def print_report(
    console: Console,
    run: str,
    months: int,
    table: dict[str, dict[str, int]],
    state: dict[str, Any],
    start: datetime,
    end: datetime,
    days: int,
    elapsed: float,
) -> None:
    out = Table(title=f"billing demo --months {months}: run {run}, by calendar month (UTC)")
    out.add_column("month", no_wrap=True)
    for _, header, _ in MONTHLY_COLUMNS:
        out.add_column(header, justify="right", no_wrap=True)
    for month in next(iter(table.values())):
        out.add_row(
            month,
            *(
                usd(table[k][month]) if k == "revenue" else f"{table[k][month]:,}"
                for k, _, _ in MONTHLY_COLUMNS
            ),
        )
    out.add_section()
    out.add_row(
        "total",
        *(
            usd(sum(table[k].values())) if k == "revenue" else f"{sum(table[k].values()):,}"
            for k, _, _ in MONTHLY_COLUMNS
        ),
        style="bold",
    )
    console.print(out)
    for _, header, meaning in MONTHLY_COLUMNS:
        console.print(f"  [dim]{header:>10}[/dim]  {meaning}")

    statuses = state["statuses"]
    console.print(
        "at the end: "
        + ", ".join(f"{statuses.get(s, 0):,} {s}" for s in ("active", "past_due", "canceled"))
        + f" subscriptions; {state['cap_refused']:,} auto-top-ups refused by a monthly cap; "
        f"{state['self_disabled']:,} accounts' auto-top-up off after repeated declines"
    )
    ledger = state["ledger"]
    revenue = -(ledger.get("subscription_charge", 0) + ledger.get("renewal_charge", 0))
    money_in = ledger.get("opening", 0) + ledger.get("top_up", 0) + ledger.get("payments", 0)
    balances = state["balances"]
    check = "[green]=[/green]" if money_in - revenue == balances else "[red]MISMATCH[/red]"
    console.print(
        f"money: opening {usd(ledger.get('opening', 0))} + top-ups {usd(ledger.get('top_up', 0))} "
        f"+ payments {usd(ledger.get('payments', 0))} - revenue {usd(revenue)} "
        f"= {usd(money_in - revenue)} {check} balances {usd(balances)}"
    )
    console.print(
        f"simulated {start:%Y-%m-%d} to {end:%Y-%m-%d} ({days} days) in {elapsed:.1f} s of wall time "
        f"({elapsed / days * 1000:.0f} ms per simulated day)"
    )


def print_audit(console: Console, report: Any, log_path: Path) -> bool:
    if report.ok:
        console.print(
            f"[green bold]audit passed[/green bold] ({len(report.violations)} checks; worker log: {log_path})"
        )
        return True
    for name, rows in report.violations.items():
        if rows:
            console.print(f"[red]FAIL[/red] {report.descriptions[name]} ({len(rows)})")
    console.print_json(json.dumps({k: v for k, v in report.violations.items() if v}, default=str))
    console.print(f"[red bold]AUDIT FAILED[/red bold] (worker log: {log_path})")
    return False
