"""``billing reconcile``: the provider's charges under our keys against our top-up attempts and credits.

What is compared, and how, is :func:`workers.reconcile.reconcile`'s; this
module reads the window, runs it and prints the report (a table, or JSON).
Exit 0 when they agree, :data:`workers.reconcile.EXIT_MISMATCHES` with the mismatches.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from ..reconcile import EXIT_MISMATCHES, ReconcileReport, reconcile
from .common import UsageProblem, run_db

__all__ = ["reconcile_command"]


def _timestamp(option: str, value: str) -> datetime:
    """``value`` (ISO 8601 with an offset, or a date: midnight UTC) as an aware UTC datetime."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageProblem(
            f"{option} must be an ISO 8601 timestamp, e.g. 2026-02-01T00:00:00Z (got {value!r})"
        ) from None
    if parsed.tzinfo is None:
        if len(value) == 10:  # a date alone
            return parsed.replace(tzinfo=UTC)
        raise UsageProblem(f"{option} needs a UTC offset (Z or +00:00), got {value!r}")
    return parsed.astimezone(UTC)


def _money(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def _print_report(report: ReconcileReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if report.settled is not None:
        s = report.settled
        settled = ", ".join(f"{n} {state}" for state, n in sorted(s.reconciler.settled.items())) or "none"
        console.print(
            f"settle: {s.taken} pending attempts taken, {s.reconciler.looked_up} looked up, settled: {settled}, "
            f"{s.reconciler.unanswered} unanswered" + (" (more remain: run it again)" if s.more else "")
        )
    console.print(
        f"{report.provider} provider, {report.since.isoformat()} to {report.until.isoformat()}: "
        f"{report.charges} charges under our keys, {report.attempts} attempts, {report.in_flight} in flight"
    )
    if report.ok:
        console.print("ok: the provider's charges and our attempts and credits agree")
        return
    table = Table(title=f"{len(report.mismatches)} mismatches")
    for col in (
        "kind",
        "provider key",
        "charge",
        "attempt",
        "account",
        "provider",
        "ours",
        "credited",
        "detail",
    ):
        table.add_column(col, overflow="fold")
    for m in report.mismatches:
        table.add_row(
            m.kind,
            m.provider_key or "",
            m.charge_id or "",
            m.attempt_id or "",
            m.account_id or "",
            " ".join(x for x in (m.provider_state, _money(m.provider_amount_micros), m.currency or "") if x),
            " ".join(x for x in (m.attempt_status, _money(m.attempt_amount_micros)) if x),
            _money(m.credited_micros),
            m.detail,
        )
    console.print(table)


@click.command("reconcile")
@click.option("--since", "since", required=True, help="Start of the window, ISO 8601 UTC (inclusive).")
@click.option("--until", "until", required=True, help="End of the window, ISO 8601 UTC (exclusive).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--settle",
    is_flag=True,
    help="First run the reconciler now on the window's pending attempts (writes: credits, failures).",
)
def reconcile_command(since: str, until: str, as_json: bool, settle: bool) -> None:
    """Compare the provider's charges under our keys with our top-up attempts and credits, both ways.

    Read-only unless --settle. Exit 0 when they agree, 3 with the mismatches.
    """
    from ..app import build_provider
    from ..logging import configure_logging
    from ..settings import get_settings

    start, end = _timestamp("--since", since), _timestamp("--until", until)
    if start >= end:
        raise UsageProblem("--since must be before --until")
    settings = get_settings()
    # the reconciler's log lines go to stderr: stdout is the report (--json parses)
    configure_logging(settings.log_format, settings.log_level)

    async def go(engine: AsyncEngine) -> ReconcileReport:
        provider = build_provider(settings, engine)
        try:
            return await reconcile(
                engine, provider, since=start, until=end, settle=settle, policy=settings.billing_policy()
            )
        finally:
            await provider.close()

    report: ReconcileReport = run_db(go)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2, default=str))
    else:
        _print_report(report)
    sys.exit(0 if report.ok else EXIT_MISMATCHES)
