"""``billing dashboard``: serve the operator dashboard with uvicorn."""

from __future__ import annotations

import click

from tasks.errors import ConfigurationError

__all__ = ["dashboard_command", "LOOPBACK_HOSTS"]

#: Where ``--dev`` (no login) may listen: this machine only.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


@click.command("dashboard")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65_535), default=8080, show_default=True)
@click.option("--dev", is_flag=True, help="No login (a DEV banner shows); only with --host 127.0.0.1.")
def dashboard_command(host: str, port: int, dev: bool) -> None:
    """Serve the operator dashboard: queues, failures, retries, accounts, the audit log.

    Needs BILLING_DASHBOARD_TOKEN (operators log in with it and their name),
    BILLING_DATABASE_URL and BILLING_REDIS_URL.
    """
    from workers.settings import get_settings

    from .app import MIN_TOKEN_LENGTH, create_app

    settings = get_settings()
    token = settings.dashboard_token.get_secret_value() if settings.dashboard_token else ""
    if dev and host not in LOOPBACK_HOSTS:
        raise click.UsageError(
            "--dev serves without a login, so it listens only on 127.0.0.1 (--host 127.0.0.1)"
        )
    if not dev and not token:
        raise click.UsageError(
            "BILLING_DASHBOARD_TOKEN is not set: set it (e.g. `openssl rand -hex 32`), "
            "or run `billing dashboard --dev` on 127.0.0.1 without a login"
        )
    if not dev and len(token) < MIN_TOKEN_LENGTH:
        raise click.UsageError(
            f"BILLING_DASHBOARD_TOKEN is too short: use at least {MIN_TOKEN_LENGTH} characters"
        )
    if not settings.database_url:
        raise ConfigurationError("BILLING_DATABASE_URL is not set")
    if not settings.message_broker_url():
        raise ConfigurationError("BILLING_BROKER_URL (or BILLING_REDIS_URL) is not set")

    import uvicorn

    from workers.logging import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings, dev=dev)
    click.echo(
        f"billing dashboard on http://{host}:{port}/" + (" (DEV mode: no login)" if dev else ""), err=True
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )
