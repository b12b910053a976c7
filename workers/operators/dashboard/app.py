"""The operator dashboard: Starlette routes over :mod:`workers.operators.actions`, rendered with Jinja2.

Pages (GET): ``/`` queues, ``/failures`` (filters in the query string),
``/messages/{id}``, ``/accounts/{id}``, ``/actions``, ``/login``.
Actions (POST, CSRF-checked): ``/login``, ``/logout``, ``/retry`` (one
message, or every dead failure matching filters, or a dry run of that),
``/messages/{id}/resolve`` and ``/messages/{id}/replay``.

Access: a login with ``BILLING_DASHBOARD_TOKEN`` (compared with
:func:`hmac.compare_digest`) and an operator name, which the audit log
records (``via="dashboard"``).  The session lives in a signed cookie
(HttpOnly, SameSite=Strict) holding the operator name, a random CSRF token
and the login time.  Every POST must carry that CSRF token in its form.
``dev`` mode (``billing dashboard --dev``, loopback only) needs no login.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import click
import dramatiq
import jinja2
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db import operators as sql
from db.operators import NOT_RETRYABLE, FailureFilter
from db.queries import account_snapshot
from tasks.errors import (
    AlreadyReplayed,
    BrokerMisconfigured,
    BrokerUnavailable,
    ConfigurationError,
    MessageValidationError,
)
from tasks.messages import MESSAGE_MODELS
from workers.dependencies import dependency_error
from workers.operators import actions
from workers.operators.redis_layout import queue_overview
from workers.settings import Settings

__all__ = ["create_app", "session_secret", "MIN_TOKEN_LENGTH", "SECURITY_HEADERS"]

HERE = Path(__file__).resolve().parent

#: Shortest token accepted: a token is the only thing between the network and
#: the retry buttons, so a guessable one is refused (``openssl rand -hex 32``).
MIN_TOKEN_LENGTH = 16

#: On every response.  No script runs on these pages, inline or not; styles
#: come from ``/static/dashboard.css`` only; no framing, no referrer leaks
#: (message ids and account ids are in URLs); pages are not cached.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'none'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    ),
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}

#: The failures filter's actors: the contract's (:data:`tasks.messages.MESSAGE_MODELS`).
ACTORS = tuple(MESSAGE_MODELS)
STATUSES = ("dead", "retried", "resolved")
#: Most rows a list page shows (the filters narrow it down).
MAX_ROWS = 500
#: Most failures one "retry all matching" takes (the CLI's limit too).
RETRY_ALL_LIMIT = 10_000


def session_secret(settings: Settings) -> str:
    """The key that signs session cookies.

    ``BILLING_DASHBOARD_SECRET`` when set; else derived from the token (so
    changing the token logs everyone out); else (``--dev``) random per start.
    """
    if settings.dashboard_secret is not None and settings.dashboard_secret.get_secret_value():
        return settings.dashboard_secret.get_secret_value()
    if settings.dashboard_token is not None and settings.dashboard_token.get_secret_value():
        token = settings.dashboard_token.get_secret_value().encode()
        return hmac.new(token, b"billing-dashboard-session-v1", hashlib.sha256).hexdigest()
    return secrets.token_hex(32)


class SecurityHeaders:
    """ASGI middleware that adds :data:`SECURITY_HEADERS` to every response (errors included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [
                    (k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in present
                ]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------- template helpers


def _money(micros: int | None, currency: str | None = None) -> str:
    if micros is None:
        return ""
    major = (Decimal(micros) / 1_000_000).quantize(Decimal("0.01"))
    return f"{major:,} {currency or ''} ({micros:,} micros)".replace("  ", " ")


def _ts(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(money=_money, ts=_ts, age=_age, to_json=_to_json)
    env.globals.update(NOT_RETRYABLE=NOT_RETRYABLE, ACTORS=ACTORS, STATUSES=STATUSES)
    return Jinja2Templates(env=env)


# --------------------------------------------------------------------------- sessions and guards


def _safe_back(value: str | None, default: str = "/") -> str:
    """A local path to go back to (never another site: no ``//host``, no scheme)."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return default


def _flash(request: Request, level: str, text: str) -> None:
    request.session["flash"] = [*request.session.get("flash", []), [level, text]]


def _csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def _token_tag(settings: Settings) -> str:
    """A short fingerprint of the token kept in the session: rotating the token ends old sessions."""
    token = settings.dashboard_token.get_secret_value() if settings.dashboard_token else ""
    return hmac.new(b"billing-dashboard-token-tag", token.encode(), hashlib.sha256).hexdigest()[:16]


def _operator(request: Request) -> str | None:
    """The logged-in operator's name, or None (always the local operator in dev mode)."""
    state = request.app.state
    if state.dev:
        return str(state.dev_operator)
    session = request.session
    name = session.get("operator")
    if not isinstance(name, str) or not name:
        return None
    expired = (
        time.time() - float(session.get("login_at", 0)) > state.settings.dashboard_session_max_age_ms / 1000
    )
    if expired or not hmac.compare_digest(str(session.get("token_tag", "")), _token_tag(state.settings)):
        session.clear()
        return None
    return name


def _csrf_ok(request: Request, form: FormData) -> bool:
    sent = form.get("csrf")
    expected = request.session.get("csrf")
    return (
        isinstance(sent, str)
        and isinstance(expected, str)
        and bool(expected)
        and hmac.compare_digest(sent.encode(), expected.encode())
    )


Page = Callable[[Request, str], Awaitable[Response]]
Action = Callable[[Request, str, FormData], Awaitable[Response]]


async def _unless_a_dependency_fails(request: Request, call: Awaitable[Response]) -> Response:
    """``await call``; a dependency down or misconfigured (PostgreSQL, Redis) is a styled 503 page saying which."""
    try:
        return await call
    except Exception as exc:
        error = dependency_error(exc)
        if error is None or error.exit_code != 1:  # not a dependency's: a bug, shown as one
            raise
        return _render(request, "error.html", status_code=503, status=503, detail=error.message)


def page(fn: Page) -> Callable[[Request], Awaitable[Response]]:
    """A GET page: redirects to the login page unless logged in; a dependency down is a 503 page."""

    async def endpoint(request: Request) -> Response:
        operator = _operator(request)
        if operator is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
        return await _unless_a_dependency_fails(request, fn(request, operator))

    endpoint.__doc__ = fn.__doc__
    return endpoint


def action(fn: Action) -> Callable[[Request], Awaitable[Response]]:
    """A state-changing POST: 403 unless logged in and the form carries the session's CSRF token.

    A dependency down or misconfigured (PostgreSQL, Redis) is a 503 page saying which.
    """

    async def endpoint(request: Request) -> Response:
        operator = _operator(request)
        if operator is None:
            raise HTTPException(403, "not logged in")
        form = await request.form()
        if not _csrf_ok(request, form):
            raise HTTPException(403, "missing or wrong CSRF token")
        return await _unless_a_dependency_fails(request, fn(request, operator, form))

    endpoint.__doc__ = fn.__doc__
    return endpoint


def _render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    state = request.app.state
    templates: Jinja2Templates = state.templates
    return templates.TemplateResponse(
        request,
        name,
        {
            "dev": state.dev,
            "operator": _operator(request),
            "csrf": _csrf_token(request),
            "flashes": request.session.pop("flash", []),
            "here": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            **context,
        },
        status_code=status_code,
    )


def _engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    return engine


def _broker(request: Request) -> dramatiq.Broker:
    broker: dramatiq.Broker = request.app.state.broker
    return broker


# --------------------------------------------------------------------------- login


async def login_page(request: Request) -> Response:
    """The login form (token and operator name)."""
    if _operator(request) is not None:
        return RedirectResponse(_safe_back(request.query_params.get("next")), status_code=303)
    return _render(request, "login.html", error=None, next=_safe_back(request.query_params.get("next")))


async def login(request: Request) -> Response:
    """Check the token (constant time) and the CSRF token; start a fresh session for the operator."""
    state = request.app.state
    if state.dev:
        return RedirectResponse("/", status_code=303)
    form = await request.form()
    if not _csrf_ok(request, form):
        raise HTTPException(403, "missing or wrong CSRF token (reload the login page)")
    sent = str(form.get("token") or "")
    name = " ".join(str(form.get("operator") or "").split())
    expected = state.settings.dashboard_token.get_secret_value()
    token_ok = hmac.compare_digest(sent.encode(), expected.encode())
    next_path = _safe_back(str(form.get("next") or ""))
    if not token_ok or not name or len(name) > 100 or not name.isprintable():
        error = "Wrong token." if not token_ok else "Give your name (1 to 100 characters) for the audit log."
        return _render(
            request, "login.html", status_code=403 if not token_ok else 400, error=error, next=next_path
        )
    request.session.clear()  # a new session: nothing from before the login survives
    request.session.update(
        operator=name,
        login_at=time.time(),
        token_tag=_token_tag(state.settings),
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
    async with _engine(request).connect() as conn:
        recorded = await sql.failure_counts(conn)
    client = getattr(_broker(request), "client", None)
    try:
        stats, workers = await asyncio.to_thread(
            queue_overview, client, heartbeat_timeout_ms=request.app.state.settings.heartbeat_timeout_ms
        )
    except Exception as exc:
        error = dependency_error(exc)
        if not isinstance(error, (BrokerUnavailable, BrokerMisconfigured)):
            raise
        return _render(
            request,
            "queues.html",
            status_code=503,
            stats=[],
            workers=[],
            recorded=recorded,
            redis_error=error.message,
        )
    return _render(request, "queues.html", stats=stats, workers=workers, recorded=recorded, redis_error=None)


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
        return _render(
            request, "failures.html", status_code=400, error=str(exc), filters=raw, rows=[], preview=None
        )
    async with _engine(request).connect() as conn:
        rows = await sql.list_failures(conn, filt, limit=MAX_ROWS)
        # what "retry all matching" would take: the dead ones (any status filter aside)
        dead = await sql.list_failures(
            conn, FailureFilter(**{**filt.__dict__, "status": "dead"}), limit=RETRY_ALL_LIMIT
        )
    retryable = sum(1 for f in dead if f["error_type"] not in NOT_RETRYABLE)
    preview = {"retryable": retryable, "not_retryable": len(dead) - retryable}
    return _render(
        request, "failures.html", error=None, filters=raw, rows=rows, preview=preview, limit=MAX_ROWS
    )


@page
async def message_page(request: Request, operator: str) -> Response:
    """A failed message: arguments, error, traceback, idempotency record, account summary; actions."""
    message_id = request.path_params["message_id"]
    detail = await actions.failure_detail(_engine(request), message_id)
    if detail is None:
        raise HTTPException(404, f"no failed message {message_id!r}")
    return _render(request, "message.html", detail=detail, f=detail["failure"])


async def account_lookup(request: Request) -> Response:
    """``/accounts?id=X`` (the search box) -> ``/accounts/X``."""
    account_id = str(request.query_params.get("id") or "").strip()
    return RedirectResponse(f"/accounts/{account_id}" if account_id else "/", status_code=303)


@page
async def account_page(request: Request, operator: str) -> Response:
    """An account's summary (no secrets) and its timeline."""
    account_id = request.path_params["account_id"]
    snapshot = await account_snapshot(_engine(request), account_id)
    if snapshot is None:
        raise HTTPException(404, f"unknown account {account_id!r}")
    async with _engine(request).connect() as conn:
        events = await sql.account_timeline(conn, account_id) or []
    return _render(request, "account.html", snapshot=snapshot, a=snapshot["account"], events=events)


@page
async def actions_page(request: Request, operator: str) -> Response:
    """The audit log of operator actions, newest first."""
    async with _engine(request).connect() as conn:
        rows = await sql.list_actions(conn, limit=MAX_ROWS)
    return _render(request, "actions.html", rows=rows)


# --------------------------------------------------------------------------- actions


@action
async def retry(request: Request, operator: str, form: FormData) -> Response:
    """Retry one message (``message_id``) or every dead failure matching the filters (``mode=all``).

    ``mode=preview`` is the dry run of ``all``: it changes nothing and says how many.
    Redirects back (``back``) with a flash message saying what happened.
    """
    back = _safe_back(str(form.get("back") or ""), "/failures")
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
        _flash(request, "error", f"Nothing retried: {exc}.")
        return RedirectResponse(back, status_code=303)
    report = await actions.retry_failures(
        _engine(request),
        _broker(request),
        operator=operator,
        via="dashboard",
        dry_run=mode == "preview",
        **kwargs,
    )
    _flash(request, "error" if report.skipped and not report.retried else "ok", _retry_summary(report, mode))
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
        _flash(
            request, "error", "Not resolved: say why no retry is needed (the note is kept with the failure)."
        )
    elif await actions.resolve(
        _engine(request), message_id, operator=operator, via="dashboard", resolution=note
    ):
        _flash(request, "ok", f"Resolved message {message_id}.")
    else:
        _flash(request, "error", f"Not resolved: message {message_id} is unknown or already resolved.")
    return RedirectResponse(back, status_code=303)


@action
async def replay(request: Request, operator: str, form: FormData) -> Response:
    """Publish a failed message again under a NEW key; only with the confirmation box ticked."""
    message_id = request.path_params["message_id"]
    back = f"/messages/{quote(message_id, safe='')}"
    new_key = str(form.get("new_key") or "").strip()
    if form.get("confirm") != "yes":
        _flash(
            request,
            "error",
            "Not replayed: tick the box to confirm that this is a new request that may charge again.",
        )
        return RedirectResponse(back, status_code=303)
    try:
        new_id = await actions.replay_with_new_key(
            _engine(request),
            _broker(request),
            message_id,
            new_key=new_key,
            operator=operator,
            via="dashboard",
        )
    except (LookupError, MessageValidationError, AlreadyReplayed) as exc:
        _flash(request, "error", f"Not replayed: {exc}")
    else:
        _flash(request, "ok", f"Replayed message {message_id} as {new_id} with the new key {new_key}.")
    return RedirectResponse(back, status_code=303)


# --------------------------------------------------------------------------- app


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _render(
        request, "error.html", status_code=exc.status_code, status=exc.status_code, detail=exc.detail
    )


def create_app(
    settings: Settings,
    engine: AsyncEngine | None = None,
    broker: dramatiq.Broker | None = None,
    *,
    dev: bool = False,
    dev_operator: str | None = None,
) -> Starlette:
    """Build the dashboard application.

    Parameters:
      settings: ``dashboard_*`` settings, and the database and Redis URLs used
        when ``engine`` / ``broker`` are not given (then they are created at
        startup and closed at shutdown).
      engine, broker: Ready ones (tests); the caller closes them.
      dev: No login (the local operator acts, see :func:`workers.operators.actions.operator_name`),
        a DEV banner, and only ``127.0.0.1`` / ``localhost`` accepted as Host.
      dev_operator: Who acts in dev mode (default: :func:`workers.operators.actions.operator_name`).

    Raises:
      ConfigurationError: No ``dashboard_token`` (or one shorter than
        :data:`MIN_TOKEN_LENGTH`) outside dev mode.
    """
    token = settings.dashboard_token.get_secret_value() if settings.dashboard_token else ""
    if not dev and len(token) < MIN_TOKEN_LENGTH:
        raise ConfigurationError(
            f"BILLING_DASHBOARD_TOKEN must be set to at least {MIN_TOKEN_LENGTH} characters"
            " (or use --dev on 127.0.0.1)"
        )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        from db.engine import make_engine
        from workers.broker import make_broker

        own_engine = app.state.engine is None
        own_broker = app.state.broker is None
        if own_engine:
            if not settings.database_url:
                raise ConfigurationError("BILLING_DATABASE_URL is not set")
            app.state.engine = make_engine(settings.database_url, pool_size=4, max_overflow=4)
        if own_broker:
            app.state.broker = make_broker(settings)
        try:
            yield
        finally:
            if own_engine:
                await app.state.engine.dispose()
            if own_broker:
                app.state.broker.close()

    middleware = [Middleware(SecurityHeaders)]
    if dev:
        # no login in dev mode: refuse other Host names (DNS rebinding from a web page)
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"]))
    middleware.append(
        Middleware(
            SessionMiddleware,
            secret_key=session_secret(settings),
            session_cookie="billing_dashboard",
            max_age=settings.dashboard_session_max_age_ms // 1000,
            same_site="strict",
            https_only=settings.dashboard_cookie_secure,
        )
    )
    routes = [
        Route("/", queues_page, name="queues"),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/failures", failures_page, name="failures"),
        Route("/retry", retry, methods=["POST"]),
        Route("/messages/{message_id:path}/resolve", resolve, methods=["POST"]),
        Route("/messages/{message_id:path}/replay", replay, methods=["POST"]),
        Route("/messages/{message_id:path}", message_page),
        Route("/accounts", account_lookup),
        Route("/accounts/{account_id:path}", account_page),
        Route("/actions", actions_page, name="actions"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.broker = broker
    app.state.dev = dev
    app.state.dev_operator = (dev_operator or actions.operator_name()) if dev else None
    app.state.templates = _templates()
    return app
