"""The dashboard's web layer: security headers, sessions and login state, CSRF, page and action guards, templates.

Sessions live in a signed cookie (Starlette's ``SessionMiddleware``, key
:func:`session_secret`) holding the operator name, a random CSRF token, the
login time and a tag of the token (:func:`token_tag`: rotating the token
ends old sessions).  :func:`page` and :func:`action` wrap the handlers of
:mod:`.pages`: a page redirects to the login unless logged in, an action
answers 403 without a login and the session's CSRF token; either shows a
dependency that is down (PostgreSQL, Redis) as a 503 page saying which.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import dramatiq
import jinja2
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.operators import NOT_RETRYABLE
from tasks.messages import MESSAGE_MODELS
from workers.dependencies import dependency_error
from workers.settings import Settings

__all__ = [
    "ACTORS",
    "HERE",
    "MIN_TOKEN_LENGTH",
    "SECURITY_HEADERS",
    "STATUSES",
    "SecurityHeaders",
    "action",
    "broker_of",
    "build_templates",
    "csrf_ok",
    "csrf_token",
    "current_operator",
    "engine_of",
    "flash",
    "page",
    "render",
    "safe_back",
    "session_secret",
    "token_tag",
]

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


def build_templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(money=_money, ts=_ts, age=_age, to_json=_to_json)
    env.globals.update(NOT_RETRYABLE=NOT_RETRYABLE, ACTORS=ACTORS, STATUSES=STATUSES)
    return Jinja2Templates(env=env)


# --------------------------------------------------------------------------- sessions and guards


def safe_back(value: str | None, default: str = "/") -> str:
    """A local path to go back to (never another site: no ``//host``, no scheme)."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return default


def flash(request: Request, level: str, text: str) -> None:
    request.session["flash"] = [*request.session.get("flash", []), [level, text]]


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def token_tag(settings: Settings) -> str:
    """A short fingerprint of the token kept in the session: rotating the token ends old sessions."""
    token = settings.dashboard_token.get_secret_value() if settings.dashboard_token else ""
    return hmac.new(b"billing-dashboard-token-tag", token.encode(), hashlib.sha256).hexdigest()[:16]


def current_operator(request: Request) -> str | None:
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
    if expired or not hmac.compare_digest(str(session.get("token_tag", "")), token_tag(state.settings)):
        session.clear()
        return None
    return name


def csrf_ok(request: Request, form: FormData) -> bool:
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
        return render(request, "error.html", status_code=503, status=503, detail=error.message)


def page(fn: Page) -> Callable[[Request], Awaitable[Response]]:
    """A GET page: redirects to the login page unless logged in; a dependency down is a 503 page."""

    async def endpoint(request: Request) -> Response:
        operator = current_operator(request)
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
        operator = current_operator(request)
        if operator is None:
            raise HTTPException(403, "not logged in")
        form = await request.form()
        if not csrf_ok(request, form):
            raise HTTPException(403, "missing or wrong CSRF token")
        return await _unless_a_dependency_fails(request, fn(request, operator, form))

    endpoint.__doc__ = fn.__doc__
    return endpoint


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    state = request.app.state
    templates: Jinja2Templates = state.templates
    return templates.TemplateResponse(
        request,
        name,
        {
            "dev": state.dev,
            "operator": current_operator(request),
            "csrf": csrf_token(request),
            "flashes": request.session.pop("flash", []),
            "here": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            **context,
        },
        status_code=status_code,
    )


def engine_of(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    return engine


def broker_of(request: Request) -> dramatiq.Broker:
    broker: dramatiq.Broker = request.app.state.broker
    return broker
