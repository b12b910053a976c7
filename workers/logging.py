"""structlog configuration: JSON in production, readable console output by hand.

Every log line of a message carries ``message_id``, ``actor``,
``idempotency_key`` and ``account_id`` (bound per message through
contextvars).  Nothing secret is ever logged: API key plaintexts and payment
method references are not passed to the logger.

One line per event, whatever the number of processes:

* structlog writes each line, newline included, with a single ``write()``
  (:class:`structlog.WriteLoggerFactory`).  A worker process's stderr is
  Dramatiq's logging pipe, which forwards every ``write()`` as one message
  to the parent; ``print()`` wrote the text and the newline separately, so
  two processes could merge two lines into one.
* The stdlib's records (Dramatiq's own) are rendered by the same renderer
  through :class:`structlog.stdlib.ProcessorFormatter`: in JSON, a
  traceback is the ``exception`` field of its line, not 40 more lines.
* A failure the money path already logged (one ``message_failed``,
  ``transient_error`` or ``retries_exhausted`` line, see
  :mod:`workers.billing`) is not logged again by Dramatiq
  (:class:`DramatiqFailureFilter`).
"""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["DramatiqFailureFilter", "configure_logging", "mark_logged"]

#: Attribute set on an exception the money path has logged (see :func:`mark_logged`).
_LOGGED = "_billing_logged"


def mark_logged(exc: BaseException) -> None:
    """Note that ``exc`` has been logged (one line), so Dramatiq does not log it again when it sees it."""
    try:
        setattr(exc, _LOGGED, True)
    except AttributeError:  # pragma: no cover - an exception type without a __dict__
        pass


class DramatiqFailureFilter(logging.Filter):
    """Drops Dramatiq's own lines about a failure that the money path has logged already.

    Dramatiq's worker logs every exception an actor raises, with its chained
    traceback at ERROR (140 lines for one provider timeout), and its Retries
    middleware adds "Aborting message" or "Retries exceeded".  Our actors log
    each failure themselves as one structured line (with a traceback only
    for an unexpected exception), so these records are dropped:

    * ``dramatiq.worker.WorkerThread``: "Failed to process message ... with
      unhandled exception" whose exception was logged (:func:`mark_logged`);
      "... with expected exception" (a permanent error: our actors record and
      log every one before raising it);
    * ``dramatiq.middleware.retries.Retries``: "Aborting message" and
      "Retries exceeded" (our ``message_failed`` / ``retries_exhausted``).

    An exception nobody logged keeps Dramatiq's record, with its traceback.
    "Retrying message ... in N milliseconds" (INFO) stays: it says when.
    """

    #: Logger name -> message prefixes (of ``record.msg``, the unformatted text) dropped there.
    DROPPED = {
        "dramatiq.worker.WorkerThread": ("Failed to process message",),
        "dramatiq.middleware.retries.Retries": ("Aborting message", "Retries exceeded"),
    }

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for a record that repeats a failure already logged; True otherwise."""
        prefixes = self.DROPPED.get(record.name)
        if not prefixes or not isinstance(record.msg, str) or not record.msg.startswith(prefixes):
            return True
        if record.name == "dramatiq.worker.WorkerThread" and "expected exception" not in record.msg:
            exc = record.exc_info[1] if record.exc_info else None
            return not getattr(exc, _LOGGED, False)
        return False


def _install_filter() -> None:
    for name in DramatiqFailureFilter.DROPPED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DramatiqFailureFilter) for f in logger.filters):
            logger.addFilter(DramatiqFailureFilter())


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Configure structlog and the stdlib root logger.

    Parameters:
      fmt: ``json`` (one JSON object a line) or ``console``.
      level: A stdlib level name (structlog's lines; the stdlib's own level
        is left to whoever configured it first, Dramatiq's CLI in a worker).
    """
    json_lines = fmt == "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    )
    # JSON: a traceback becomes the line's "exception" field; the console renderer prints it itself
    tracebacks: list[structlog.typing.Processor] = (
        [structlog.processors.format_exc_info] if json_lines else []
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *tracebacks,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # one write() per line, newline included (see the module docstring)
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tracebacks, renderer],
    )
    for handler in logging.getLogger().handlers:
        # plain stream handlers only (ours, or Dramatiq's on its logging pipe), not a test runner's
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(formatter)
    _install_filter()
