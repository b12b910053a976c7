"""What the ``billing`` commands share: input checks, the database and broker they run on, output helpers.

Input checks raise :class:`UsageProblem` (bad input, exit 2); the ids and
amounts are checked by the message contract's own types
(:data:`tasks.messages.Identifier`, :data:`tasks.messages.AmountMicros`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from pydantic import TypeAdapter, ValidationError

from tasks.errors import ConfigurationError
from tasks.messages import MAX_AMOUNT_MICROS, AmountMicros, Identifier

__all__ = [
    "UsageProblem",
    "check_amount",
    "check_currency",
    "check_id",
    "check_top_up_amount",
    "database",
    "json_text",
    "now",
    "print_table",
    "run_db",
    "run_services",
]


_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)
_AMOUNT: TypeAdapter[int] = TypeAdapter(AmountMicros)
#: ISO 4217 alphabetic code, in capitals (the accounts' and plans' currency).
_CURRENCY = re.compile(r"^[A-Z]{3}$")


class UsageProblem(click.UsageError):
    """Bad input on the command line (exit 2, nothing written)."""


def check_id(what: str, value: str) -> str:
    """``value`` if it is a contract identifier (1 to 255 printable characters, no whitespace).

    Raises:
      UsageProblem: Naming ``what``.
    """
    try:
        return _IDENTIFIER.validate_python(value)
    except ValidationError:
        raise UsageProblem(f"{what} must be 1 to 255 printable characters without whitespace") from None


def check_currency(value: str) -> str:
    """``value`` if it is a 3-letter ISO 4217 code in capitals.

    Raises:
      UsageProblem: Any other text.
    """
    if not _CURRENCY.match(value):
        raise UsageProblem(f"currency must be a 3-letter ISO 4217 code in capitals (got {value!r})")
    return value


def check_amount(what: str, value: int | None, *, minimum: int) -> int | None:
    """``value`` (micros) if None or a contract amount; ``minimum`` 0 also takes 0 (balances, thresholds).

    Raises:
      UsageProblem: Below ``minimum`` or above :data:`tasks.messages.MAX_AMOUNT_MICROS`.
    """
    if value is None or (minimum == 0 and value == 0):
        return value
    try:
        return _AMOUNT.validate_python(value)
    except ValidationError:
        raise UsageProblem(
            f"{what} must be an integer between {minimum} and {MAX_AMOUNT_MICROS} micros"
        ) from None


def check_top_up_amount(option: str, amount: int, currency: str) -> None:
    """Refuse a top-up amount the configured provider could never charge in ``currency`` (bad input, exit 2).

    The rule is the provider's (:meth:`workers.providers.base.PaymentProvider.check_amount`;
    Stripe: whole minor units, :func:`workers.providers.stripe.to_minor_units`).
    """
    from tasks.errors import ProviderRejected

    from ..providers import provider_class
    from ..settings import get_settings

    try:
        provider_class(get_settings().payment_provider).check_amount(amount, currency)
    except ProviderRejected as exc:
        raise UsageProblem(f"{option}: {exc.message}") from exc


def now() -> datetime:
    """The wall clock, UTC."""
    return datetime.now(UTC)


@contextmanager
def database() -> Iterator[str]:
    """The URL of ``BILLING_DATABASE_URL``, else of an embedded PostgreSQL kept in ``BILLING_LOCAL_DIR``."""
    from ..settings import get_settings

    settings = get_settings()
    url = settings.database_url
    if url:
        yield url
        return
    from ..local import embedded_postgres

    with embedded_postgres(Path(settings.local_dir) / "pgdata") as embedded:
        yield embedded


def run_db(fn: Callable[[Any], Any]) -> Any:
    """Run ``await fn(engine)`` on the configured (or local embedded) database; return its result.

    Driver errors (no such database, no schema yet, server down...) propagate
    to :func:`workers.cli.root.main`, which says what they mean in one line.
    """
    from ..app import build_engine
    from ..settings import get_settings

    with database() as url:

        async def go() -> Any:
            engine = build_engine(get_settings().model_copy(update={"database_url": url}), pool_size=2)
            try:
                return await fn(engine)
            finally:
                await engine.dispose()

        return asyncio.run(go())


def run_services(fn: Callable[[Any, Any], Any], *, needs_redis: bool = False) -> Any:
    """Run ``await fn(engine, broker)`` on the configured database and broker; return its result.

    ``broker`` (Redis or RabbitMQ, :func:`workers.app.build_broker`) is None
    when no broker URL is set (``BILLING_BROKER_URL``, ``BILLING_REDIS_URL``)
    and ``needs_redis`` is false.

    Raises:
      ConfigurationError: ``BILLING_DATABASE_URL`` unset, or no broker URL and one is needed.
    """
    from ..app import build_broker, build_engine
    from ..settings import get_settings

    settings = get_settings()
    if not settings.database_url:
        raise ConfigurationError("BILLING_DATABASE_URL is not set")
    if needs_redis and not settings.message_broker_url():
        raise ConfigurationError("BILLING_BROKER_URL (or BILLING_REDIS_URL) is not set")
    broker = build_broker(settings) if settings.message_broker_url() else None

    async def go() -> Any:
        engine = build_engine(settings, pool_size=2)
        try:
            return await fn(engine, broker)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(go())
    finally:
        if broker is not None:
            broker.close()


def json_text(value: Any) -> str:
    """``value`` as indented JSON; datetimes in ISO 8601, anything else unknown as ``str``."""
    return json.dumps(value, indent=2, default=lambda v: v.isoformat() if hasattr(v, "isoformat") else str(v))


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print ``rows`` as a table of ``columns`` (None as empty) on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    Console().print(table)
