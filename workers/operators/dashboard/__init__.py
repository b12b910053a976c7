"""The operator dashboard (``billing dashboard``): server-rendered pages over :mod:`workers.operators.actions`.

The application factory is :func:`workers.operators.dashboard.app.create_app`; it is
not imported here, so the ``billing`` CLI loads Starlette only for this command.
"""

from .command import LOOPBACK_HOSTS, dashboard_command

__all__ = [
    # the CLI command
    "dashboard_command",
    "LOOPBACK_HOSTS",
]
