"""Operators' SQL: failed messages, their retries and resolutions, the audit log, timelines.

Nothing here moves money.  A retry changes two things in PostgreSQL before
the message goes back on its queue, in one transaction: the message's
idempotency key is made runnable again (``dead`` or ``failed`` -> ``failed``
with its delivery count reset, so a poison message an operator chose to
retry gets a fresh budget), and the failure row is marked ``retried``.  The
money path then applies the message exactly once, as for any delivery.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from .money.record_usage import usage_event

__all__ = [
    "FailureFilter",
    "NOT_RETRYABLE",
    "list_failures",
    "get_failure",
    "key_record",
    "prepare_retry",
    "resolve_failure",
    "claim_replay",
    "failure_counts",
    "record_action",
    "list_actions",
    "account_timeline",
]

#: Failures a retry cannot fix: the same message fails the same way again.
#: A malformed message or a key reused with other arguments needs a new
#: message (``billing ops replay`` with a new key), not a retry.
NOT_RETRYABLE = {
    "message_validation_error": "the message is malformed; it would be rejected again",
    "idempotency_conflict": "the key was used before with other arguments; replay it with a new key",
    # a retry would sign what nobody signed: the producer must send it again, signed
    "message_authentication_failed": "the message is not signed by a known key; the producer must send it again, signed",
}


@dataclass(frozen=True)
class FailureFilter:
    """Which failed messages to list or retry (None: any).

    Attributes:
      actor: Actor name, e.g. ``renew``.
      account: Account id.
      since: Last seen at or after this time (UTC).
      error: Text contained in the error type or message (case-insensitive).
      status: ``dead`` (default for retries), ``retried`` or ``resolved``.
    """

    actor: str | None = None
    account: str | None = None
    since: datetime | None = None
    error: str | None = None
    status: str | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        """SQL condition and parameters for ``failed_messages f``."""
        clauses: list[str] = ["true"]
        params: dict[str, Any] = {}
        if self.actor is not None:
            clauses.append("f.actor_name = :actor")
            params["actor"] = self.actor
        if self.account is not None:
            clauses.append("f.account_id = :account")
            params["account"] = self.account
        if self.since is not None:
            clauses.append("f.last_seen_at >= :since")
            params["since"] = self.since
        if self.error is not None:
            clauses.append("(f.error_type ILIKE :error OR f.error_message ILIKE :error)")
            params["error"] = (
                "%" + self.error.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            )
        if self.status is not None:
            clauses.append("f.status = :status")
            params["status"] = self.status
        return " AND ".join(clauses), params


_FAILURE_COLUMNS = """
    f.message_id, f.actor_name, f.queue_name, f.kwargs, f.idempotency_key, f.account_id, f.error_type,
    f.error_message, f.attempts, f.status, f.first_seen_at, f.last_seen_at, f.retry_count, f.last_retried_at,
    f.last_retried_by, f.resolved_at, f.resolved_by, f.resolution, f.replayed_at, f.replayed_by, f.replay_key,
    f.replay_message_id, k.status AS key_status
"""


def _plain(row: Any) -> dict[str, Any]:
    return dict(row)


async def list_failures(
    conn: AsyncConnection, filt: FailureFilter, *, limit: int = 50
) -> list[dict[str, Any]]:
    """Failed messages matching ``filt``, newest first (by last seen), without tracebacks.

    ``key_status`` is the message key's state now: ``completed`` means a
    retry (or another delivery) has since applied it.
    """
    where, params = filt.where()
    rows = await conn.execute(
        text(
            f"""
            SELECT {_FAILURE_COLUMNS} FROM failed_messages f
            LEFT JOIN idempotency_keys k ON k.key = f.idempotency_key
            WHERE {where} ORDER BY f.last_seen_at DESC, f.message_id LIMIT :limit
            """
        ).columns(kwargs=JSONB),
        {**params, "limit": limit},
    )
    return [_plain(r) for r in rows.mappings().all()]


async def get_failure(conn: AsyncConnection, message_id: str) -> dict[str, Any] | None:
    """One failed message with its traceback, or None."""
    row = await conn.execute(
        text(
            f"""
            SELECT {_FAILURE_COLUMNS}, f.traceback FROM failed_messages f
            LEFT JOIN idempotency_keys k ON k.key = f.idempotency_key
            WHERE f.message_id = :id
            """
        ).columns(kwargs=JSONB),
        {"id": message_id},
    )
    found = row.mappings().one_or_none()
    return _plain(found) if found is not None else None


async def key_record(conn: AsyncConnection, key: str) -> dict[str, Any] | None:
    """The stored state and outcome of an idempotency key, or None.

    A usage event's key (``record_usage``) also carries its ``usage_event``
    row (amount, charged and owed micros, meter, ledger entry), None until applied.
    """
    row = await conn.execute(
        text(
            """
            SELECT key, kind, status, result, attempts, last_error, account_id, message_id,
                   created_at, updated_at, completed_at
            FROM idempotency_keys WHERE key = :key
            """
        ).columns(result=JSONB),
        {"key": key},
    )
    found = row.mappings().one_or_none()
    if found is None:
        return None
    record = _plain(found)
    if found["kind"] == "record_usage":
        record["usage_event"] = await usage_event(conn, key)
    return record


_RESET_KEY = text(
    """
    UPDATE idempotency_keys SET status = 'failed', attempts = 0, updated_at = now()
    WHERE key = :key AND status IN ('failed', 'dead')
    """
)
_MARK_RETRIED = text(
    """
    UPDATE failed_messages SET status = 'retried', retry_count = retry_count + 1,
        last_retried_at = now(), last_retried_by = :operator
    WHERE message_id = :id
    """
)


async def prepare_retry(conn: AsyncConnection, failure: dict[str, Any], *, operator: str) -> None:
    """In the caller's transaction: make the key runnable again and mark the failure ``retried``.

    The caller enqueues the message before committing, so a failed enqueue
    changes nothing.  A worker that picks the message up before the commit
    waits on the key row's lock, then sees the reset.

    Raises:
      ValueError: The failure's error type is in :data:`NOT_RETRYABLE`.
    """
    if failure["error_type"] in NOT_RETRYABLE:
        raise ValueError(NOT_RETRYABLE[failure["error_type"]])
    if failure["idempotency_key"] is not None:
        await conn.execute(_RESET_KEY, {"key": failure["idempotency_key"]})
    await conn.execute(_MARK_RETRIED, {"id": failure["message_id"], "operator": operator})


_RESOLVE = text(
    """
    UPDATE failed_messages SET status = 'resolved', resolved_at = now(), resolved_by = :operator,
        resolution = :resolution
    WHERE message_id = :id AND status <> 'resolved'
    RETURNING message_id
    """
)


async def resolve_failure(conn: AsyncConnection, message_id: str, *, operator: str, resolution: str) -> bool:
    """Mark a failure ``resolved`` (handled without a retry, or replayed). Returns False if unknown or resolved."""
    row = await conn.execute(
        _RESOLVE, {"id": message_id, "operator": operator, "resolution": resolution[:2000]}
    )
    return row.one_or_none() is not None


_CLAIM_REPLAY = text(
    """
    UPDATE failed_messages SET replayed_at = now(), replayed_by = :operator, replay_key = :new_key,
        replay_message_id = :new_message_id
    WHERE message_id = :id AND replayed_at IS NULL
    RETURNING message_id
    """
)


async def claim_replay(
    conn: AsyncConnection, message_id: str, *, operator: str, new_key: str, new_message_id: str
) -> bool:
    """In the caller's transaction: record that ``message_id`` is replayed, unless it was already.

    One conditional UPDATE (``WHERE replayed_at IS NULL``): of two replays
    that race, the second blocks on the row until the first commits, then
    matches nothing.  The caller enqueues the new message only when this
    returns True, before committing.

    Returns:
      True when this call recorded the replay; False when the failure is
      unknown or was replayed before (see :func:`get_failure` for by whom).
    """
    row = await conn.execute(
        _CLAIM_REPLAY,
        {"id": message_id, "operator": operator, "new_key": new_key, "new_message_id": new_message_id},
    )
    return row.one_or_none() is not None


async def failure_counts(conn: AsyncConnection) -> list[dict[str, Any]]:
    """Failures recorded in PostgreSQL, per queue: ``queue``, ``dead``, ``retried``, ``resolved``.

    Read by the dashboard's Queues page, which shows it even when Redis is down.
    """
    rows = await conn.execute(
        text(
            """
            SELECT queue_name AS queue,
                   count(*) FILTER (WHERE status = 'dead') AS dead,
                   count(*) FILTER (WHERE status = 'retried') AS retried,
                   count(*) FILTER (WHERE status = 'resolved') AS resolved
            FROM failed_messages GROUP BY queue_name ORDER BY queue_name
            """
        )
    )
    return [_plain(r) for r in rows.mappings().all()]


_RECORD_ACTION = text(
    """
    INSERT INTO operator_actions (operator, via, action, target, count, details)
    VALUES (:operator, :via, :action, :target, :count, :details)
    RETURNING id
    """
).bindparams(bindparam("target", type_=JSONB), bindparam("details", type_=JSONB))


async def record_action(
    conn: AsyncConnection,
    *,
    operator: str,
    via: str,
    action: str,
    target: dict[str, Any],
    count: int,
    details: dict[str, Any] | None = None,
) -> int:
    """Append one operator action to the audit log (``operator_actions``). Returns its id.

    Parameters:
      via: ``cli`` or ``dashboard``.
      action: ``retry``, ``retry_all``, ``replay``, ``resolve`` or ``purge_dead``.
      target: What it acted on (message ids, filters), JSON-ready.
      count: How many messages it affected.
    """
    row = await conn.execute(
        _RECORD_ACTION,
        {
            "operator": operator,
            "via": via,
            "action": action,
            "target": target,
            "count": count,
            "details": details or {},
        },
    )
    return int(row.scalar_one())


async def list_actions(conn: AsyncConnection, *, limit: int = 50) -> list[dict[str, Any]]:
    """The latest operator actions, newest first."""
    rows = await conn.execute(
        text(
            "SELECT id, at, operator, via, action, target, count, details FROM operator_actions "
            "ORDER BY at DESC, id DESC LIMIT :limit"
        ).columns(target=JSONB, details=JSONB),
        {"limit": limit},
    )
    return [_plain(r) for r in rows.mappings().all()]


# One row per event, in time order; API keys without hashes, the account
# without its payment method reference.
_TIMELINE = """
    SELECT created_at AS at, 'ledger' AS source, kind AS event,
           jsonb_build_object('amount_micros', amount_micros, 'subscription_id', subscription_id,
                              'period_start', period_start, 'idempotency_key', idempotency_key) AS details
    FROM ledger_entries WHERE account_id = :id
    UNION ALL
    SELECT created_at, 'subscription', 'created',
           jsonb_build_object('subscription_id', id, 'plan_id', plan_id, 'key', created_by_key)
    FROM subscriptions WHERE account_id = :id
    UNION ALL
    SELECT past_due_since, 'subscription', 'past_due',
           jsonb_build_object('subscription_id', id, 'grace_ends_at', grace_ends_at, 'status', status)
    FROM subscriptions WHERE account_id = :id AND past_due_since IS NOT NULL
    UNION ALL
    SELECT canceled_at, 'subscription', 'canceled',
           jsonb_build_object('subscription_id', id, 'reason', cancel_reason)
    FROM subscriptions WHERE account_id = :id AND canceled_at IS NOT NULL
    UNION ALL
    SELECT created_at, 'api_key', 'issued',
           jsonb_build_object('key_id', id, 'prefix', prefix, 'source', source, 'subscription_id', subscription_id)
    FROM api_keys WHERE account_id = :id
    UNION ALL
    SELECT revoked_at, 'api_key', 'revoked', jsonb_build_object('key_id', id, 'reason', revoke_reason)
    FROM api_keys WHERE account_id = :id AND revoked_at IS NOT NULL
    UNION ALL
    SELECT created_at, 'top_up', status,
           jsonb_build_object('attempt_id', id, 'amount_micros', amount_micros, 'period', billing_period,
                              'decline_reason', decline_reason, 'provider_charge_id', provider_charge_id)
    FROM top_up_attempts WHERE account_id = :id
    UNION ALL
    SELECT last_seen_at, 'failure', error_type,
           jsonb_build_object('message_id', message_id, 'actor', actor_name, 'status', status,
                              'idempotency_key', idempotency_key)
    FROM failed_messages WHERE account_id = :id
"""


async def account_timeline(
    conn: AsyncConnection, account_id: str, *, limit: int = 500
) -> list[dict[str, Any]] | None:
    """Events of an account in time order (ledger, subscriptions, keys, top-ups, failures), or None if unknown.

    No secrets: API keys appear by id and prefix, never by hash.
    """
    exists = await conn.execute(text("SELECT 1 FROM accounts WHERE id = :id"), {"id": account_id})
    if exists.one_or_none() is None:
        return None
    rows = await conn.execute(
        text(f"SELECT * FROM ({_TIMELINE}) t ORDER BY at, source LIMIT :limit").columns(details=JSONB),
        {"id": account_id, "limit": limit},
    )
    return [_plain(r) for r in rows.mappings().all()]
