"""``billing ops ...``: what operators run to see queues and failures, and to retry them.

Every command takes ``--json``.  State-changing commands (``retry``,
``replay``, ``resolve``, ``purge-dead``) write who (``BILLING_OPERATOR``, else
``user@host``), what, when and how many to the audit log
(``operator_actions``); ``billing ops actions`` lists it.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from db.operators import FailureFilter
from tasks.messages import MESSAGE_MODELS

from ..cli.common import json_text, print_table, run_services

__all__ = ["ops_app", "parse_duration", "reissue_key_command"]

_DURATION = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(value: str) -> timedelta:
    """``30s``, ``15m``, ``12h``, ``7d`` or ``2w`` as a timedelta.

    Raises:
      click.BadParameter: Any other form.
    """
    match = _DURATION.match(value.strip())
    if not match:
        raise click.BadParameter(f"{value!r} is not a duration like 30s, 15m, 12h, 7d or 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _since(value: str | None) -> datetime | None:
    """``--since``: an ISO 8601 time (UTC if no offset) or a duration back from now (``2h``)."""
    if value is None:
        return None
    if _DURATION.match(value.strip()):
        return datetime.now(UTC) - parse_duration(value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is neither an ISO 8601 time nor a duration like 2h") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _filter_options(fn: Any) -> Any:
    for option in reversed(
        [
            click.option("--actor", "actor", type=click.Choice(list(MESSAGE_MODELS))),
            click.option("--account", "account", type=str, default=None, help="Account id."),
            click.option(
                "--since", "since", type=str, default=None, help="ISO 8601 time or a duration (2h, 7d)."
            ),
            click.option(
                "--error", "error", type=str, default=None, help="Text in the error type or message."
            ),
        ]
    ):
        fn = option(fn)
    return fn


@click.group("ops")
def ops_app() -> None:
    """Operators: queues, failures, retries (each command takes --json)."""


@ops_app.command("queues")
@click.option("--json", "as_json", is_flag=True)
def queues(as_json: bool) -> None:
    """Per queue: ready, delayed, in flight, dead-lettered, age of the oldest ready; workers seen."""
    from ..rabbitmq import BillingRabbitmqBroker
    from ..settings import get_settings
    from . import rabbitmq_layout
    from .redis_layout import queue_overview

    settings = get_settings()

    async def go(engine: Any, broker: Any) -> Any:
        if isinstance(broker, BillingRabbitmqBroker):
            return await asyncio.to_thread(rabbitmq_layout.queue_overview, broker)
        return await asyncio.to_thread(
            queue_overview, broker.client, heartbeat_timeout_ms=settings.heartbeat_timeout_ms
        )

    stats, workers = run_services(go, needs_redis=True)
    if as_json:
        click.echo(json_text({"queues": [asdict(s) for s in stats], "workers": [asdict(w) for w in workers]}))
        return
    print_table(
        "queues",
        [{**asdict(s), "oldest_ready_age_s": _age(s.oldest_ready_age_s)} for s in stats],
        ["queue", "ready", "delayed", "in_flight", "dead", "oldest_ready_age_s"],
    )
    print_table(
        "workers seen (heartbeats; producers beat too)",
        [{**asdict(w), "last_heartbeat_age_s": _age(w.last_heartbeat_age_s)} for w in workers],
        ["worker_id", "alive", "holding", "last_heartbeat_age_s"],
    )


def _age(seconds: float | None) -> str | None:
    return None if seconds is None else f"{seconds:.1f}s"


@ops_app.command("failures")
@_filter_options
@click.option("--status", "status", type=click.Choice(["dead", "retried", "resolved"]), default=None)
@click.option("--limit", "limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def failures(
    actor: str | None,
    account: str | None,
    since: str | None,
    error: str | None,
    status: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Failed messages, newest first."""
    from db import operators as sql

    filt = FailureFilter(actor=actor, account=account, since=_since(since), error=error, status=status)

    async def go(engine: Any, broker: Any) -> Any:
        async with engine.connect() as conn:
            return await sql.list_failures(conn, filt, limit=limit)

    rows = run_services(go)
    if as_json:
        click.echo(json_text(rows))
        return
    print_table(
        f"failed messages ({len(rows)})",
        rows,
        [
            "last_seen_at",
            "message_id",
            "actor_name",
            "account_id",
            "error_type",
            "status",
            "attempts",
            "key_status",
        ],
    )


@ops_app.command("show")
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True)
def show(message_id: str, as_json: bool) -> None:
    """A failed message: arguments, error, traceback, its idempotency record and its account."""
    from .actions import failure_detail

    detail = run_services(lambda engine, broker: failure_detail(engine, message_id))
    if detail is None:
        raise click.UsageError(f"no failed message {message_id!r}")
    if as_json:
        click.echo(json_text(detail))
        return
    f = detail["failure"]
    click.echo(f"message {f['message_id']}  {f['actor_name']} on {f['queue_name']}  status {f['status']}")
    click.echo(f"error   {f['error_type']}: {f['error_message']}")
    click.echo(
        f"seen    {f['first_seen_at']} .. {f['last_seen_at']}  attempts {f['attempts']}  retries {f['retry_count']}"
    )
    click.echo(f"args    {json.dumps(f['kwargs'])}")
    click.echo(f"key     {json.dumps(detail['idempotency_key'], default=str)}")
    if f.get("replayed_at") is not None:
        click.echo(
            f"replay  {f['replayed_at']} by {f['replayed_by']} with key {f['replay_key']}"
            f" as message {f['replay_message_id']}"
        )
    if detail["account"] is not None:
        a = detail["account"]["account"]
        click.echo(f"account {a['id']}  balance {a['balance_micros']:,} micros {a['currency']}")
    click.echo("traceback:")
    click.echo(f["traceback"] or "(none)")


@ops_app.command("retry")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Every dead failure matching the filters.")
@_filter_options
@click.option("--dry-run", is_flag=True, help="Show what would be retried; change nothing.")
@click.option("--json", "as_json", is_flag=True)
def retry(
    message_ids: tuple[str, ...],
    retry_all: bool,
    actor: str | None,
    account: str | None,
    since: str | None,
    error: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Re-enqueue failed messages with the same idempotency key (safe: processing is idempotent)."""
    from .actions import operator_name, retry_failures

    if bool(message_ids) == retry_all:
        raise click.UsageError("give MESSAGE_ID... or --all (with optional filters)")
    if message_ids and any(v is not None for v in (actor, account, since, error)):
        raise click.UsageError("filters go with --all")
    filt = (
        FailureFilter(actor=actor, account=account, since=_since(since), error=error) if retry_all else None
    )
    show_bar = retry_all and not as_json and sys.stdout.isatty()

    async def go(engine: Any, broker: Any) -> Any:
        kwargs: dict[str, Any] = {
            "operator": operator_name(),
            "via": "cli",
            "message_ids": list(message_ids) if message_ids else None,
            "filt": filt,
            "dry_run": dry_run,
        }
        if not show_bar:
            return await retry_failures(engine, broker, **kwargs)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with Progress(TextColumn("retrying"), BarColumn(), MofNCompleteColumn()) as bar:
            task = bar.add_task("retry", total=None)
            return await retry_failures(
                engine,
                broker,
                on_progress=lambda done, total: bar.update(task, completed=done, total=total),
                **kwargs,
            )

    report = run_services(go, needs_redis=True)
    if as_json:
        click.echo(json_text(asdict(report)))
    else:
        verb = "would retry" if dry_run else "retried"
        click.echo(f"{verb} {len(report.retried)}, skipped {len(report.skipped)}")
        for mid, why in report.skipped.items():
            click.echo(f"  skipped {mid}: {why}")
    if report.skipped and not report.retried:
        # nothing could be retried as asked (unknown ids, malformed messages, conflicts): bad input
        first, why = next(iter(report.skipped.items()))
        more = f" (and {len(report.skipped) - 1} more)" if len(report.skipped) > 1 else ""
        raise click.UsageError(f"nothing retried: {first}: {why}{more}")


@ops_app.command("replay")
@click.argument("message_id")
@click.option(
    "--new-key",
    "new_key",
    required=True,
    help="A NEW idempotency key: the message is applied as a new request.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True)
def replay(message_id: str, new_key: str, yes: bool, as_json: bool) -> None:
    """Publish a failed message again under a NEW key: a new request, which may charge again."""
    from .actions import operator_name, replay_with_new_key

    if not yes:
        click.confirm(
            f"Replay {message_id} as a new request with key {new_key!r}? Unlike a retry, this can charge again",
            abort=True,
        )
    try:
        new_id = run_services(
            lambda engine, broker: replay_with_new_key(
                engine, broker, message_id, new_key=new_key, operator=operator_name(), via="cli"
            ),
            needs_redis=True,
        )
    except LookupError as exc:
        raise click.UsageError(str(exc)) from exc
    if as_json:
        click.echo(json_text({"message_id": new_id, "idempotency_key": new_key, "replayed": message_id}))
    else:
        click.echo(f"replayed {message_id} as {new_id} with key {new_key}")


@ops_app.command("resolve")
@click.argument("message_id")
@click.option("--note", "note", required=True, help="Why no retry is needed (kept with the failure).")
@click.option("--json", "as_json", is_flag=True)
def resolve_cmd(message_id: str, note: str, as_json: bool) -> None:
    """Mark a failure resolved without retrying it."""
    from .actions import operator_name, resolve

    done = run_services(
        lambda engine, broker: resolve(
            engine, message_id, operator=operator_name(), via="cli", resolution=note
        )
    )
    if not done:
        raise click.UsageError(f"no unresolved failed message {message_id!r}")
    click.echo(json_text({"resolved": message_id}) if as_json else f"resolved {message_id}")


@ops_app.command("purge-dead")
@click.option("--older-than", "older_than", default="7d", show_default=True, help="Duration: 30m, 12h, 7d...")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def purge_dead_cmd(older_than: str, yes: bool, dry_run: bool, as_json: bool) -> None:
    """Delete dead-lettered messages older than a duration from Redis (PostgreSQL keeps their record)."""
    from ..settings import get_settings
    from .actions import operator_name, purge_dead

    if get_settings().broker_kind() == "rabbitmq":
        raise click.UsageError(
            "purge-dead reads Redis; on RabbitMQ dead-lettered messages expire from each queue's .XQ"
            " after BILLING_DEAD_MESSAGE_TTL_MS (x-message-ttl), or purge the .XQ queue with rabbitmqctl"
        )
    age = parse_duration(older_than)
    if not yes and not dry_run:
        click.confirm(f"Delete dead-lettered messages older than {older_than} from Redis?", abort=True)
    counts = run_services(
        lambda engine, broker: purge_dead(
            engine, broker.client, older_than=age, operator=operator_name(), via="cli", dry_run=dry_run
        ),
        needs_redis=True,
    )
    if as_json:
        click.echo(json_text({"dry_run": dry_run, "purged": counts}))
    else:
        verb = "would purge" if dry_run else "purged"
        click.echo(", ".join(f"{verb} {n} from {q}" for q, n in counts.items()))


@ops_app.command("key")
@click.argument("idempotency_key")
@click.option("--json", "as_json", is_flag=True)
def key(idempotency_key: str, as_json: bool) -> None:
    """The stored state and outcome of an idempotency key."""
    from db import operators as sql

    async def go(engine: Any, broker: Any) -> Any:
        async with engine.connect() as conn:
            return await sql.key_record(conn, idempotency_key)

    record = run_services(go)
    if record is None:
        raise click.UsageError(f"no idempotency key {idempotency_key!r}")
    click.echo(json_text(record) if as_json else "\n".join(f"{k:>13}  {v}" for k, v in record.items()))


@ops_app.command("account")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True)
def account(account_id: str, as_json: bool) -> None:
    """A timeline of the account: ledger, subscriptions, keys (no secrets), top-ups, failures."""
    from db import operators as sql

    async def go(engine: Any, broker: Any) -> Any:
        async with engine.connect() as conn:
            return await sql.account_timeline(conn, account_id)

    events = run_services(go)
    if events is None:
        raise click.UsageError(f"unknown account {account_id!r}")
    if as_json:
        click.echo(json_text(events))
        return
    print_table(
        f"account {account_id}",
        [{**e, "details": json.dumps(e["details"], default=str)} for e in events],
        ["at", "source", "event", "details"],
    )


@ops_app.command("actions")
@click.option("--limit", "limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def actions(limit: int, as_json: bool) -> None:
    """The audit log of operator actions, newest first."""
    from db import operators as sql

    async def go(engine: Any, broker: Any) -> Any:
        async with engine.connect() as conn:
            return await sql.list_actions(conn, limit=limit)

    rows = run_services(go)
    if as_json:
        click.echo(json_text(rows))
        return
    print_table("operator actions", rows, ["at", "operator", "via", "action", "count", "target"])


@ops_app.command("reissue-key")
@click.argument("key_id")
@click.option(
    "--idempotency-key",
    "idempotency_key",
    required=True,
    help="The request's key: a repeat returns the first outcome; another key id under it is a conflict.",
)
@click.option("--json", "as_json", is_flag=True)
def reissue_key_command(key_id: str, idempotency_key: str, as_json: bool) -> None:
    """Revoke an active managed key and issue its replacement, sealed and kept until acknowledged (audit-logged).

    One transaction: the old key is revoked, the new one inserted with its
    sealed delivery, and the action written to the operator audit log.  The
    new key reaches the subscriber like any issued key (``billing keys fetch``).
    """
    from db.errors import KeyNotReissuable

    from ..key_delivery import reissue_key
    from ..settings import get_settings
    from .actions import operator_name

    policy = get_settings().billing_policy()
    try:
        outcome = run_services(
            lambda engine, broker: reissue_key(
                engine,
                key_id=key_id,
                idempotency_key=idempotency_key,
                policy=policy,
                operator=operator_name(),
                via="cli",
                now=datetime.now(UTC),
            )
        )
    except KeyNotReissuable as exc:
        raise click.UsageError(exc.message) from exc
    if as_json:
        click.echo(json_text(outcome))
        return
    again = " (already done under this idempotency key; nothing changed)" if outcome["repeat"] else ""
    click.echo(
        f"key {key_id} revoked and replaced by {outcome['key_id']} ({outcome['key_prefix']}), "
        f"delivery {outcome['delivery_id']} pending{again}"
    )
