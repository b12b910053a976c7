"""structlog configuration: JSON in production, readable console output by hand.

Every log line of a message carries ``message_id``, ``actor``,
``idempotency_key`` and ``account_id`` (bound per message through
contextvars).  Nothing secret is ever logged: API key plaintexts and payment
method references are not passed to the logger.

One line per event, whatever the number of processes:

* structlog writes each line, newline included, with a single ``write()``
  (:class:`LineBatchingLogger`; on the event loop, the lines of one turn in
  one ``write()``).  A worker process's stderr is Dramatiq's logging pipe,
  which forwards every ``write()`` as one message to the parent; ``print()``
  wrote the text and the newline separately, so two processes could merge
  two lines into one.
* The stdlib's records (Dramatiq's own) are rendered by the same renderer
  through :class:`structlog.stdlib.ProcessorFormatter`: in JSON, a
  traceback is the ``exception`` field of its line, not 40 more lines.
* A failure the money path already logged (one ``message_failed``,
  ``transient_error`` or ``retries_exhausted`` line, see
  :mod:`workers.billing`) is not logged again by Dramatiq
  (:class:`DramatiqFailureFilter`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import Any

import structlog

__all__ = ["DramatiqFailureFilter", "LineBatchingLogger", "configure_logging", "mark_logged"]

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


class LineBatchingLogger:
    """structlog's ``WriteLogger``, but the lines logged on an event loop in one turn go out in one ``write()``.

    A batch of messages finishes on the event loop in one turn, each with its
    line: written one by one, each is a system call here and a forwarded
    message in Dramatiq's parent process, which at thousands of messages a
    second costs more than the messages.  Lines logged on a running event
    loop are kept until the end of that turn (a callback the first one
    schedules with ``call_soon``) and written together; each is still one
    whole line, newline included.  Lines logged anywhere else are written at
    once, as before.

    Parameters:
      file: The stream (``sys.stderr``).
    """

    def __init__(self, file: Any) -> None:
        self._write = file.write
        self._flush = file.flush
        self._lock = threading.Lock()
        self._pending: list[str] = []

    def msg(self, message: str) -> None:
        """Write ``message`` and a newline: now, or at the end of the event loop's turn."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            with self._lock:
                self._write(message + "\n")
                self._flush()
            return
        with self._lock:
            first = not self._pending
            self._pending.append(message + "\n")
        if first:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the lines kept so far, in one ``write()``."""
        with self._lock:
            if not self._pending:
                return
            text, self._pending = "".join(self._pending), []
            self._write(text)
            self._flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class LineBatchingLoggerFactory:
    """Builds the one :class:`LineBatchingLogger` of a stream (structlog's ``logger_factory``)."""

    def __init__(self, file: Any) -> None:
        self._logger = LineBatchingLogger(file)

    def __call__(self, *args: Any) -> LineBatchingLogger:
        return self._logger


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
        # whole lines, newline included, in one write() (see the module docstring); on the
        # event loop, the lines of one turn in one write()
        logger_factory=LineBatchingLoggerFactory(sys.stderr),
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
