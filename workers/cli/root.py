"""The ``billing`` console script (Click): the root group and its one error handler.

Every error prints one line on stderr (``billing: error: ...``), never a
traceback, and exits non-zero: 2 for bad input (a malformed option, an
unknown id, an idempotency conflict: nothing was written), 1 for a
dependency that is down or misconfigured (PostgreSQL, Redis, settings).
:func:`main` is the one place that translates errors
(:func:`workers.dependencies.dependency_error`,
:attr:`tasks.errors.BillingError.exit_code`).

The commands live in their own modules and are imported when used
(:data:`COMMANDS`); installed packages add more through the entry-point
group :data:`ENTRY_POINT_GROUP` (the harness's ``billing demo``), so the
runtime never imports them.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points
from typing import NoReturn

import click

from ..dependencies import dependency_error, one_line

__all__ = ["COMMANDS", "ENTRY_POINT_GROUP", "app", "main"]

#: Command name -> ``module:attribute`` of its Click command or group.
COMMANDS: dict[str, str] = {
    "account": "workers.cli.accounts:account_app",
    "audit": "workers.cli.services:audit",
    "contract": "workers.cli.services:contract",
    "dashboard": "workers.operators.dashboard:dashboard_command",
    "db": "workers.cli.accounts:db_app",
    "keys": "workers.cli.keys:keys_app",
    "ops": "workers.operators.cli:ops_app",
    "plan": "workers.cli.accounts:plan_app",
    "publish": "workers.cli.publish:publish_app",
    "reconcile": "workers.cli.reconcile:reconcile_command",
    "scheduler": "workers.cli.services:scheduler",
    "subscription": "workers.cli.accounts:subscription_app",
    "worker": "workers.cli.services:worker",
}

#: Entry-point group of the commands other installed packages add (name -> Click command).
ENTRY_POINT_GROUP = "billing.commands"


class BillingGroup(click.Group):
    """The root group: :data:`COMMANDS` and the :data:`ENTRY_POINT_GROUP` commands, each loaded when used."""

    def _plugins(self) -> dict[str, str]:
        return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in COMMANDS}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS, *self._plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name) or self._plugins().get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a Click command")
        return command


@click.group(name="billing", cls=BillingGroup, context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """Idempotent prepaid-credit billing on Dramatiq (Redis) and PostgreSQL."""


def _debug() -> bool:
    """``BILLING_DEBUG``, read through Settings; False when the settings themselves are what failed."""
    from ..settings import get_settings

    try:
        return get_settings().debug
    except Exception:  # noqa: BLE001 - the error being reported may be the settings' own
        return False


def _fail(message: str, code: int) -> NoReturn:
    """Print ``billing: error: {message}`` as one line on stderr and exit with ``code``."""
    print(f"billing: error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``billing`` console script.

    Exit status: 0 on success; 2 for bad input (click's usage errors and
    every :class:`~tasks.errors.PermanentError`); 1 for a dependency that is
    down or misconfigured (:class:`~tasks.errors.TransientError`,
    :class:`~tasks.errors.ConfigurationError`, and the driver errors
    :func:`workers.dependencies.dependency_error` translates) and for an
    unexpected error (``BILLING_DEBUG=1`` re-raises it with its traceback).
    Whatever the error, stderr gets exactly one ``billing: error: ...`` line.
    """
    try:
        result = app.main(args=argv, prog_name="billing", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("billing: aborted", file=sys.stderr)
        sys.exit(1)
    except click.ClickException as exc:  # usage errors and bad parameters: bad input
        _fail(exc.format_message(), 2)
    except Exception as exc:  # noqa: BLE001 - every error ends here, as one line
        error = dependency_error(exc)
        if error is None:
            if _debug():
                raise
            _fail(
                f"unexpected {type(exc).__name__}: {exc} (set BILLING_DEBUG=1 to see the traceback)",
                1,
            )
        else:
            _fail(error.message, error.exit_code)
    if isinstance(result, int):
        sys.exit(result)
