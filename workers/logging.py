"""structlog configuration: JSON in production, readable console output by hand.

Every log line of a message carries ``message_id``, ``actor``,
``idempotency_key`` and ``account_id`` (bound per message through
contextvars).  Nothing secret is ever logged: API key plaintexts and payment
method references are not passed to the logger.
"""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging"]


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Configure structlog and the stdlib root logger.

    Parameters:
      fmt: ``json`` (one JSON object a line) or ``console``.
      level: A stdlib level name.
    """
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
