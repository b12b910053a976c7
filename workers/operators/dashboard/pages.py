"""The dashboard's pages (GET) and actions (POST), over :mod:`workers.operators.actions`.

Pages: queues, failures (filters in the query string), a failed message,
an account, the audit log; the login form.  Actions: login, logout, retry
(one message, every dead failure matching the filters, or a dry run of
that), resolve and replay.  Each action redirects back with a flash message
saying what happened.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import click
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from db import operators as sql
from db.operators import NOT_RETRYABLE, FailureFilter
from db.queries import account_snapshot
from tasks.errors import AlreadyReplayed, BrokerMisconfigured, BrokerUnavailable, MessageValidationError
from workers.dependencies import dependency_error
from workers.operators import actions, rabbitmq_layout
from workers.operators.redis_layout import queue_overview
from workers.rabbitmq import BillingRabbitmqBroker

from .web import (
    ACTORS,
    STATUSES,
    action,
    broker_of,
    csrf_ok,
    current_operator,
    engine_of,
    flash,
    page,
    render,
    safe_back,
    token_tag,
)

__all__ = [
    "account_lookup",
    "account_page",
    "actions_page",
    "failures_page",
    "login",
    "login_page",
    "logout",
    "message_page",
    "queues_page",
    "replay",
    "resolve",
    "retry",
]

MAX_ROWS = 500
#: Most failures one "retry all matching" takes (the CLI's limit too).
RETRY_ALL_LIMIT = 10_000


# --------------------------------------------------------------------------- login


async def login_page(request: Request) -> Response:
    """The login form (token and operator name)."""
    if current_operator(request) is not None:
        return RedirectResponse(safe_back(request.query_params.get("next")), status_code=303)
    return render(request, "login.html", error=None, next=safe_back(request.query_params.get("next")))


async def login(request: Request) -> Response:
    """Check the token (constant time) and the CSRF token; start a fresh session for the operator."""
    state = request.app.state
    if state.dev:
        return RedirectResponse("/", status_code=303)
    form = await request.form()
    if not csrf_ok(request, form):
        raise HTTPException(403, "missing or wrong CSRF token (reload the login page)")
    sent = str(form.get("token") or "")
    name = " ".join(str(form.get("operator") or "").split())
    expected = state.settings.dashboard_token.get_secret_value()
    token_ok = hmac.compare_digest(sent.encode(), expected.encode())
    next_path = safe_back(str(form.get("next") or ""))
    if not token_ok or not name or len(name) > 100 or not name.isprintable():
        error = "Wrong token." if not token_ok else "Give your name (1 to 100 characters) for the audit log."
        return render(
            request, "login.html", status_code=403 if not token_ok else 400, error=error, next=next_path
        )
    request.session.clear()  # a new session: nothing from before the login survives
    request.session.update(
        operator=name,
        login_at=time.time(),
        token_tag=token_tag(state.settings),
        csrf=secrets.token_urlsafe(32),
    )
    return RedirectResponse(next_path, status_code=303)


@action
async def logout(request: Request, operator: str, form: FormData) -> Response:
    """End the session."""
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


# --------------------------------------------------------------------------- pages


@page
async def queues_page(request: Request, operator: str) -> Response:
    """Per queue: ready, delayed, in flight, dead, oldest age; the workers seen; the failures PostgreSQL holds.

    Redis down or misconfigured: a 503 page that says so, with the
    PostgreSQL part (the failures recorded per queue) still shown.
    """
    async with engine_of(request).connect() as conn:
        recorded = await sql.failure_counts(conn)
    broker = broker_of(request)
    client = getattr(broker, "client", None)
    try:
        if isinstance(broker, BillingRabbitmqBroker):
            stats, workers = await asyncio.to_thread(rabbitmq_layout.queue_overview, broker)
        else:
            stats, workers = await asyncio.to_thread(
                queue_overview, client, heartbeat_timeout_ms=request.app.state.settings.heartbeat_timeout_ms
            )
    except Exception as exc:
        error = dependency_error(exc)
        if not isinstance(error, (BrokerUnavailable, BrokerMisconfigured)):
            raise
        return render(
            request,
            "queues.html",
            status_code=503,
            stats=[],
            workers=[],
            recorded=recorded,
            redis_error=error.message,
        )
    return render(request, "queues.html", stats=stats, workers=workers, recorded=recorded, redis_error=None)


def _since(value: str) -> datetime:
    """``2h``-style durations back from now, or ISO 8601 (UTC if no offset)."""
    from workers.operators.cli import parse_duration

    try:
        return datetime.now(UTC) - parse_duration(value)
    except click.BadParameter:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(
            f"since: {value!r} is neither a duration like 2h or 7d nor an ISO 8601 time"
        ) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _raw_filters(source: Any) -> dict[str, str]:
    """The filter fields of a query string or form, as given."""
    return {k: str(source.get(k) or "").strip() for k in ("actor", "account", "since", "error", "status")}


def _filter_of(raw: dict[str, str]) -> FailureFilter:
    """The FailureFilter of :func:`_raw_filters`' fields.

    Raises:
      ValueError: An unknown actor or status, or an unreadable ``since``.
    """
    if raw["actor"] and raw["actor"] not in ACTORS:
        raise ValueError(f"actor: unknown actor {raw['actor']!r}")
    if raw["status"] and raw["status"] not in STATUSES:
        raise ValueError(f"status: unknown status {raw['status']!r}")
    return FailureFilter(
        actor=raw["actor"] or None,
        account=raw["account"] or None,
        since=_since(raw["since"]) if raw["since"] else None,
        error=raw["error"] or None,
        status=raw["status"] or None,
    )


@page
async def failures_page(request: Request, operator: str) -> Response:
    """Failed messages matching the filters, newest first, with the "retry all matching" preview."""
    raw = _raw_filters(request.query_params)
    try:
        filt = _filter_of(raw)
    except ValueError as exc:
        return render(
            request, "failures.html", status_code=400, error=str(exc), filters=raw, rows=[], preview=None
        )
    async with engine_of(request).connect() as conn:
        rows = await sql.list_failures(conn, filt, limit=MAX_ROWS)
        # what "retry all matching" would take: the dead ones (any status filter aside)
        dead = await sql.list_failures(
            conn, FailureFilter(**{**filt.__dict__, "status": "dead"}), limit=RETRY_ALL_LIMIT
        )
    retryable = sum(1 for f in dead if f["error_type"] not in NOT_RETRYABLE)
    preview = {"retryable": retryable, "not_retryable": len(dead) - retryable}
    return render(
        request, "failures.html", error=None, filters=raw, rows=rows, preview=preview, limit=MAX_ROWS
    )


@page
async def message_page(request: Request, operator: str) -> Response:
    """A failed message: arguments, error, traceback, idempotency record, account summary; actions."""
    message_id = request.path_params["message_id"]
    detail = await actions.failure_detail(engine_of(request), message_id)
    if detail is None:
        raise HTTPException(404, f"no failed message {message_id!r}")
    return render(request, "message.html", detail=detail, f=detail["failure"])


async def account_lookup(request: Request) -> Response:
    """``/accounts?id=X`` (the search box) -> ``/accounts/X``."""
    account_id = str(request.query_params.get("id") or "").strip()
    return RedirectResponse(f"/accounts/{account_id}" if account_id else "/", status_code=303)


@page
async def account_page(request: Request, operator: str) -> Response:
    """An account's summary (no secrets) and its timeline."""
    account_id = request.path_params["account_id"]
    snapshot = await account_snapshot(engine_of(request), account_id)
    if snapshot is None:
        raise HTTPException(404, f"unknown account {account_id!r}")
    async with engine_of(request).connect() as conn:
        events = await sql.account_timeline(conn, account_id) or []
    return render(request, "account.html", snapshot=snapshot, a=snapshot["account"], events=events)


@page
async def actions_page(request: Request, operator: str) -> Response:
    """The audit log of operator actions, newest first."""
    async with engine_of(request).connect() as conn:
        rows = await sql.list_actions(conn, limit=MAX_ROWS)
    return render(request, "actions.html", rows=rows)


# --------------------------------------------------------------------------- actions


@action
async def retry(request: Request, operator: str, form: FormData) -> Response:
    """Retry one message (``message_id``) or every dead failure matching the filters (``mode=all``).

    ``mode=preview`` is the dry run of ``all``: it changes nothing and says how many.
    Redirects back (``back``) with a flash message saying what happened.
    """
    back = safe_back(str(form.get("back") or ""), "/failures")
    mode = str(form.get("mode") or "one")
    message_id = str(form.get("message_id") or "").strip()
    try:
        if mode == "one":
            if not message_id:
                raise ValueError("no message id")
            kwargs: dict[str, Any] = {"message_ids": [message_id]}
        elif mode in ("all", "preview"):
            kwargs = {"filt": _filter_of(_raw_filters(form)), "limit": RETRY_ALL_LIMIT}
        else:
            raise ValueError(f"unknown mode {mode!r}")
    except ValueError as exc:
        flash(request, "error", f"Nothing retried: {exc}.")
        return RedirectResponse(back, status_code=303)
    report = await actions.retry_failures(
        engine_of(request),
        broker_of(request),
        operator=operator,
        via="dashboard",
        dry_run=mode == "preview",
        **kwargs,
    )
    flash(request, "error" if report.skipped and not report.retried else "ok", _retry_summary(report, mode))
    return RedirectResponse(back, status_code=303)


def _retry_summary(report: actions.RetryReport, mode: str) -> str:
    skipped = "; ".join(f"{mid}: {why}" for mid, why in list(report.skipped.items())[:5])
    more = f" (and {len(report.skipped) - 5} more)" if len(report.skipped) > 5 else ""
    if mode == "preview":
        text = f"Dry run: {len(report.retried)} would be retried, {len(report.skipped)} skipped. Nothing changed."
    elif mode == "one" and report.retried:
        text = (
            f"Retried message {report.retried[0]}: re-enqueued with its own idempotency key; "
            "the worker applies it once (a duplicate if it was applied meanwhile)."
        )
    else:
        text = f"Retried {len(report.retried)}, skipped {len(report.skipped)}."
    return text + (f" Skipped: {skipped}{more}." if skipped else "")


@action
async def resolve(request: Request, operator: str, form: FormData) -> Response:
    """Mark a failure resolved without retrying it (a note is required)."""
    message_id = request.path_params["message_id"]
    back = f"/messages/{quote(message_id, safe='')}"
    note = str(form.get("note") or "").strip()
    if not note:
        flash(
            request, "error", "Not resolved: say why no retry is needed (the note is kept with the failure)."
        )
    elif await actions.resolve(
        engine_of(request), message_id, operator=operator, via="dashboard", resolution=note
    ):
        flash(request, "ok", f"Resolved message {message_id}.")
    else:
        flash(request, "error", f"Not resolved: message {message_id} is unknown or already resolved.")
    return RedirectResponse(back, status_code=303)


@action
async def replay(request: Request, operator: str, form: FormData) -> Response:
    """Publish a failed message again under a NEW key; only with the confirmation box ticked."""
    message_id = request.path_params["message_id"]
    back = f"/messages/{quote(message_id, safe='')}"
    new_key = str(form.get("new_key") or "").strip()
    if form.get("confirm") != "yes":
        flash(
            request,
            "error",
            "Not replayed: tick the box to confirm that this is a new request that may charge again.",
        )
        return RedirectResponse(back, status_code=303)
    try:
        new_id = await actions.replay_with_new_key(
            engine_of(request),
            broker_of(request),
            message_id,
            new_key=new_key,
            operator=operator,
            via="dashboard",
        )
    except (LookupError, MessageValidationError, AlreadyReplayed) as exc:
        flash(request, "error", f"Not replayed: {exc}")
    else:
        flash(request, "ok", f"Replayed message {message_id} as {new_id} with the new key {new_key}.")
    return RedirectResponse(back, status_code=303)
