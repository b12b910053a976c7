"""Operator tools: queue statistics, failures, retries, replays and dead-letter purges.

Shared by ``billing ops ...`` and the web dashboard; both pass who acts
(``operator``) and through what (``via``), and every state-changing call
writes one row to the audit log (``operator_actions``).

Queues are read through :mod:`workers.operators.redis_layout`.

A retry re-enqueues the message with its own message id and idempotency
key (safe: processing is idempotent), taken from Dramatiq's dead-letter
queue while Redis still has it, else from PostgreSQL's ``failed_messages``.
"""

from __future__ import annotations

import asyncio
import getpass
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from db import money
from db import operators as sql
from db.engine import transaction
from db.money import OutboxMessage
from db.operators import NOT_RETRYABLE, FailureFilter
from db.queries import account_snapshot
from tasks.errors import AlreadyReplayed
from tasks.messages import validate_message

from .. import outbox
from .redis_layout import QUEUES, dead_ids_older_than, dead_lettered, remove_dead

__all__ = [
    "RetryReport",
    "operator_name",
    "failure_detail",
    "retry_failures",
    "replay_with_new_key",
    "purge_dead",
    "resolve",
]

log = structlog.get_logger("operators")


def operator_name() -> str:
    """Who acts from the CLI: ``BILLING_OPERATOR``, else ``{unix user}@{host}``."""
    from ..settings import get_settings

    configured = (get_settings().operator or "").strip()
    if configured:
        return configured[:200]
    return f"{getpass.getuser()}@{socket.gethostname()}"


# --------------------------------------------------------------------------- failures


async def failure_detail(engine: AsyncEngine, message_id: str) -> dict[str, Any] | None:
    """A failed message with its traceback, its idempotency record and the account it touched, or None."""
    async with engine.connect() as conn:
        failure = await sql.get_failure(conn, message_id)
        if failure is None:
            return None
        key = await sql.key_record(conn, failure["idempotency_key"]) if failure["idempotency_key"] else None
    account_id = failure["account_id"] or (key or {}).get("account_id")
    account = await account_snapshot(engine, account_id) if account_id else None
    if account is not None:
        account = {"account": account["account"], "subscriptions": account["subscriptions"]}
    return {"failure": failure, "idempotency_key": key, "account": account}


@dataclass
class RetryReport:
    """What a retry did.

    Attributes:
      retried: Message ids re-enqueued.
      skipped: Message id -> why it was not retried.
      dry_run: Nothing was changed (``retried`` lists what would be).
      action_id: The audit log row (None for a dry run).
    """

    retried: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False
    action_id: int | None = None


def _message_of(
    failure: dict[str, Any], dead: dict[str, tuple[str, dramatiq.Message[Any] | None]]
) -> dramatiq.Message[Any]:
    found = dead.get(failure["message_id"])
    if found is not None and found[1] is not None:
        original = found[1]
        # a fresh start for Dramatiq's own retry count; same id, queue, actor and arguments.
        # redis_message_id stays: a copy read from Redis (which producers can write) keeps the
        # signature it came with, never this process's (BillingRedisBroker.enqueue)
        options = {k: v for k, v in original.options.items() if k not in ("retries", "traceback")}
        return dramatiq.Message(
            queue_name=original.queue_name.removesuffix(".DQ"),
            actor_name=original.actor_name,
            args=original.args,
            kwargs=original.kwargs,
            options=options,
            message_id=original.message_id,
        )
    return dramatiq.Message(
        queue_name=failure["queue_name"],
        actor_name=failure["actor_name"],
        args=(),
        kwargs=failure["kwargs"] or {},
        options={},
        message_id=failure["message_id"],
    )


async def retry_failures(
    engine: AsyncEngine,
    broker: dramatiq.Broker,
    *,
    operator: str,
    via: str,
    message_ids: list[str] | None = None,
    filt: FailureFilter | None = None,
    dry_run: bool = False,
    limit: int = 10_000,
    on_progress: Callable[[int, int], None] | None = None,
) -> RetryReport:
    """Re-enqueue failed messages with their own message id and idempotency key.

    Either ``message_ids`` (one or several) or ``filt`` (``retry --all``;
    only ``dead`` failures). Each message: in one transaction, reset its
    key and mark the failure ``retried``, enqueue, remove it from Dramatiq's
    dead-letter queue, commit.  Malformed messages and idempotency conflicts
    are skipped with the reason (:data:`db.operators.NOT_RETRYABLE`).

    Parameters:
      operator, via: Who acts, and through ``cli`` or ``dashboard`` (audit log).
      on_progress: Called with (done, total) after each message.

    Returns:
      RetryReport. One audit log row is written unless ``dry_run``.

    Raises:
      ValueError: Neither or both of ``message_ids`` and ``filt``.
    """
    if (message_ids is None) == (filt is None):
        raise ValueError("give message ids or a filter, not both")
    async with engine.connect() as conn:
        if message_ids is not None:
            failures = [f for mid in message_ids if (f := await sql.get_failure(conn, mid)) is not None]
            missing = set(message_ids) - {f["message_id"] for f in failures}
        else:
            assert filt is not None
            failures = await sql.list_failures(
                conn, FailureFilter(**{**filt.__dict__, "status": "dead"}), limit=limit
            )
            missing = set()
    report = RetryReport(dry_run=dry_run, skipped={m: "no such failed message" for m in sorted(missing)})
    client = getattr(broker, "client", None)
    dead: dict[str, tuple[str, dramatiq.Message[Any] | None]] = {}
    if client is not None:
        for queue in {f["queue_name"] for f in failures}:
            dead.update(await asyncio.to_thread(dead_lettered, client, queue))
    for done, failure in enumerate(failures, 1):
        mid = failure["message_id"]
        if failure["error_type"] in NOT_RETRYABLE:
            report.skipped[mid] = NOT_RETRYABLE[failure["error_type"]]
        elif dry_run:
            report.retried.append(mid)
        else:
            message = _message_of(failure, dead)
            async with transaction(engine) as conn:
                await sql.prepare_retry(conn, failure, operator=operator)
                await asyncio.to_thread(broker.enqueue, message)
            if client is not None and mid in dead:
                await asyncio.to_thread(remove_dead, client, message.queue_name, [dead[mid][0]])
            report.retried.append(mid)
        if on_progress is not None:
            on_progress(done, len(failures))
    if not dry_run:
        target: dict[str, Any] = (
            {"message_ids": message_ids} if message_ids is not None else {"filter": _filter_json(filt)}
        )
        async with transaction(engine) as conn:
            report.action_id = await sql.record_action(
                conn,
                operator=operator,
                via=via,
                action="retry" if message_ids is not None else "retry_all",
                target=target,
                count=len(report.retried),
                details={
                    "retried": report.retried[:1000],
                    "skipped": dict(list(report.skipped.items())[:1000]),
                },
            )
    return report


def _filter_json(filt: FailureFilter | None) -> dict[str, Any]:
    if filt is None:
        return {}
    return {
        k: (v.isoformat() if isinstance(v, datetime) else v)
        for k, v in filt.__dict__.items()
        if v is not None
    }


async def replay_with_new_key(
    engine: AsyncEngine, broker: dramatiq.Broker, message_id: str, *, new_key: str, operator: str, via: str
) -> str:
    """Publish a failed message's arguments again under a **new** idempotency key: a new request.

    Unlike a retry this can charge again (it is not the same request), so the
    CLI asks for confirmation, and a failure is replayed **once**: the replay
    (who, when, the new key and message id) is recorded on the failure by a
    conditional UPDATE, so a second replay, even one racing this one, is
    refused.  The new message is written to the outbox in that transaction
    and relayed after commit (by the sweeper of any worker if the relay
    fails): it is never sent for a replay that did not commit, which a
    second replay could then send again.  The failure is marked
    ``resolved`` with the new key, and the action is audit-logged.

    Returns:
      The new Dramatiq message id.

    Raises:
      LookupError: No such failed message.
      tasks.errors.AlreadyReplayed: The failure was replayed before (nothing is enqueued).
      tasks.errors.MessageValidationError: The arguments with the new key break the contract.
    """
    async with engine.connect() as conn:
        failure = await sql.get_failure(conn, message_id)
    if failure is None:
        raise LookupError(f"no failed message {message_id!r}")
    if failure["replayed_at"] is not None:
        raise _already_replayed(failure)
    kwargs = {**(failure["kwargs"] or {}), "idempotency_key": new_key}
    validated = validate_message(failure["actor_name"], kwargs)
    from tasks.producer import to_dramatiq_message

    message = to_dramatiq_message(validated)
    queued = OutboxMessage(message.queue_name, message.actor_name, message.kwargs, message.message_id)
    async with transaction(engine) as conn:
        claimed = await sql.claim_replay(
            conn, message_id, operator=operator, new_key=new_key, new_message_id=message.message_id
        )
        if not claimed:  # another replay committed first: its record is visible to this statement
            winner = await sql.get_failure(conn, message_id)
            raise _already_replayed(winner or failure)
        await sql.resolve_failure(
            conn, message_id, operator=operator, resolution=f"replayed with new key {new_key}"
        )
        await sql.record_action(
            conn,
            operator=operator,
            via=via,
            action="replay",
            target={"message_id": message_id},
            count=1,
            details={
                "new_key": new_key,
                "new_message_id": message.message_id,
                "old_key": failure["idempotency_key"],
            },
        )
        await money.insert_outbox(conn, [queued])
    await outbox.relay_committed(engine, broker, [queued])
    return message.message_id


def _already_replayed(failure: dict[str, Any]) -> AlreadyReplayed:
    when = failure["replayed_at"]
    at = when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(when, datetime) else when
    return AlreadyReplayed(
        f"message {failure['message_id']} was already replayed at {at} by {failure['replayed_by']}"
        f" with key {failure['replay_key']} (as message {failure['replay_message_id']});"
        " a failure is replayed once"
    )


async def resolve(engine: AsyncEngine, message_id: str, *, operator: str, via: str, resolution: str) -> bool:
    """Mark a failure ``resolved`` without retrying it (audit-logged). Returns False if unknown or resolved."""
    async with transaction(engine) as conn:
        done = await sql.resolve_failure(conn, message_id, operator=operator, resolution=resolution)
        if done:
            await sql.record_action(
                conn,
                operator=operator,
                via=via,
                action="resolve",
                target={"message_id": message_id},
                count=1,
                details={"resolution": resolution},
            )
    return done


async def purge_dead(
    engine: AsyncEngine,
    client: Any,
    *,
    older_than: timedelta,
    operator: str,
    via: str,
    dry_run: bool = False,
) -> dict[str, int]:
    """Delete dead-lettered messages older than ``older_than`` from Redis (Dramatiq's XQ).

    PostgreSQL's ``failed_messages`` keep their record: a purge frees Redis,
    it does not forget a failure.

    Returns:
      Queue -> number purged (or that would be, for ``dry_run``).
    """
    cutoff_ms = (datetime.now(UTC) - older_than).timestamp() * 1000

    def purge() -> dict[str, int]:
        counts = {}
        for queue in QUEUES:
            ids = dead_ids_older_than(client, queue, cutoff_ms)
            if not dry_run:
                for start in range(0, len(ids), 500):
                    remove_dead(client, queue, ids[start : start + 500])
            counts[queue] = len(ids)
        return counts

    counts = await asyncio.to_thread(purge)
    if not dry_run:
        async with transaction(engine) as conn:
            await sql.record_action(
                conn,
                operator=operator,
                via=via,
                action="purge_dead",
                target={"older_than_s": older_than.total_seconds()},
                count=sum(counts.values()),
                details=counts,
            )
    return counts
