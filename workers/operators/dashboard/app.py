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

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import dramatiq
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tasks.errors import ConfigurationError
from workers.operators import actions
from workers.settings import Settings

from . import pages
from .web import (
    HERE,
    MIN_TOKEN_LENGTH,
    SECURITY_HEADERS,
    SecurityHeaders,
    build_templates,
    render,
    session_secret,
)

__all__ = ["create_app", "session_secret", "MIN_TOKEN_LENGTH", "SECURITY_HEADERS"]


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return render(
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
        from workers.app import build_broker, build_engine

        own_engine = app.state.engine is None
        own_broker = app.state.broker is None
        if own_engine:
            app.state.engine = build_engine(settings, pool_size=4, max_overflow=4)
        if own_broker:
            app.state.broker = build_broker(settings)
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
        Route("/", pages.queues_page, name="queues"),
        Route("/login", pages.login_page, methods=["GET"]),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/failures", pages.failures_page, name="failures"),
        Route("/retry", pages.retry, methods=["POST"]),
        Route("/messages/{message_id:path}/resolve", pages.resolve, methods=["POST"]),
        Route("/messages/{message_id:path}/replay", pages.replay, methods=["POST"]),
        Route("/messages/{message_id:path}", pages.message_page),
        Route("/accounts", pages.account_lookup),
        Route("/accounts/{account_id:path}", pages.account_page),
        Route("/actions", pages.actions_page, name="actions"),
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
    app.state.templates = build_templates()
    return app
