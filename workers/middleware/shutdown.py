"""ShutdownDeadline: a worker process exits within a bounded time, however it is signalled.

Dramatiq's worker process (``dramatiq.cli.worker_process``) stops gracefully
on its first SIGTERM/SIGHUP and calls ``sys.exit`` on the second.  Signalling
the whole process group (``timeout``, systemd's default ``KillMode``, most
supervisors) delivers two at once: the group's copy and the one the main
process forwards.  The ``sys.exit`` then skips ``Worker.stop``, so the AsyncIO
middleware never stops its event-loop thread; that thread is not a daemon,
and the interpreter's exit (``threading._shutdown``) waits for it forever.

This middleware, installed in each worker process at ``process_boot``:

- treats signals that arrive within :data:`SAME_REQUEST_S` of the first as
  that same stop request (the group's copy), so a group SIGTERM stops
  gracefully;
- on a later signal (a deliberate "kill now"), exits at once with
  ``os._exit``: messages in flight are not acked and Dramatiq's Redis broker
  redelivers them once the heartbeat times out;
- from the first stop request on, runs a watchdog that ends the process
  ``timeout_ms`` + :data:`KILL_GRACE_S` later whatever the graceful stop is
  waiting on (a message still running, Redis down), the same way.

``os._exit`` never acks anything, and a message is acked only after its
actor returned, so a message is either finished or left for redelivery
(where its idempotency key makes the second delivery apply it once).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from tasks.errors import ConfigurationError

__all__ = [
    "DEFAULT_SHUTDOWN_TIMEOUT_MS",
    "KILL_GRACE_S",
    "SAME_REQUEST_S",
    "SHUTDOWN_TIMEOUT_ENV",
    "ShutdownDeadline",
    "shutdown_timeout_ms_from_env",
]

#: Environment variable with the graceful shutdown timeout (``billing worker`` sets it).
SHUTDOWN_TIMEOUT_ENV = "BILLING_WORKER_SHUTDOWN_TIMEOUT_MS"
DEFAULT_SHUTDOWN_TIMEOUT_MS = 20_000
MIN_SHUTDOWN_TIMEOUT_MS = 100
MAX_SHUTDOWN_TIMEOUT_MS = 600_000
#: Past the graceful timeout, the watchdog waits this long more (Dramatiq joins its
#: worker threads, then its consumers, then requeues prefetched messages).
KILL_GRACE_S = 2.0
#: Signals within this long of the first are the same stop request.
SAME_REQUEST_S = 1.0
#: Dramatiq's exit status of a killed worker process (``dramatiq.cli.RET_KILLED``).
RET_KILLED = 1

_logger = logging.getLogger("billing.shutdown")

_Handler = Callable[[int, FrameType | None], Any]


def shutdown_timeout_ms_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """The graceful shutdown timeout from ``BILLING_WORKER_SHUTDOWN_TIMEOUT_MS`` (default 20000).

    The worker reads it through its settings (``Settings.worker_shutdown_timeout_ms``),
    which check the value with this function.

    Raises:
      ConfigurationError: The value is not an integer within 100..600000.
    """
    raw = environ.get(SHUTDOWN_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_SHUTDOWN_TIMEOUT_MS
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(
            f"{SHUTDOWN_TIMEOUT_ENV} must be a whole number of milliseconds, not {raw!r}"
        ) from None
    if not MIN_SHUTDOWN_TIMEOUT_MS <= value <= MAX_SHUTDOWN_TIMEOUT_MS:
        raise ConfigurationError(
            f"{SHUTDOWN_TIMEOUT_ENV} must be within {MIN_SHUTDOWN_TIMEOUT_MS}..{MAX_SHUTDOWN_TIMEOUT_MS}, not {value}"
        )
    return value


def _running_cell(handler: _Handler) -> Any:
    """The ``running`` flag of Dramatiq's worker-process signal handler (a closure cell), if it has one."""
    code = getattr(handler, "__code__", None)
    closure = getattr(handler, "__closure__", None)
    if code is None or not closure:
        return None
    for name, cell in zip(code.co_freevars, closure, strict=False):
        if name == "running":
            return cell
    return None


class ShutdownDeadline(Middleware):
    """Bound the stop of a ``dramatiq`` worker process (see the module docstring).

    It acts only in a process where ``process_boot`` is emitted (Dramatiq's
    CLI worker processes), never in an in-process ``dramatiq.Worker``.

    Parameters:
      timeout_ms: The graceful shutdown timeout; pass Dramatiq's CLI the same
        ``--worker-shutdown-timeout`` (``billing worker`` does).
      exit: Ends the process with a status (``os._exit``; replaced in tests).
    """

    def __init__(self, timeout_ms: int, *, exit: Callable[[int], Any] = os._exit) -> None:
        self.timeout_ms = timeout_ms
        self._exit_process = exit
        self._previous: dict[int, _Handler] = {}
        # Signal handlers can interrupt each other (and any code of the main
        # thread), so the stop request is claimed with one atomic next() and
        # no lock is taken on the signal path.
        self._claims = itertools.count()
        self._first_at: float | None = None
        self._requested = threading.Event()

    @property
    def deadline_s(self) -> float:
        """Seconds from the first stop request to the hard exit."""
        return self.timeout_ms / 1000 + KILL_GRACE_S

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        """Take over Dramatiq's worker-process handlers of SIGTERM and SIGHUP and start the watchdog."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is None:
                continue
            previous = signal.getsignal(signum)
            if callable(previous):
                self._previous[signum] = previous
                signal.signal(signum, self._on_signal)
        if self._previous:
            threading.Thread(target=self._watch, name="shutdown-deadline", daemon=True).start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Arm the watchdog when the graceful stop begins (also after a signal that came before boot ended)."""
        if self._previous:
            self._claim()

    def _claim(self) -> bool:
        """Record the first stop request and arm the watchdog; False if one was already recorded."""
        if next(self._claims):
            return False
        self._first_at = time.monotonic()
        self._requested.set()
        return True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous[signum]
        cell = _running_cell(previous)
        already_stopping = cell is not None and not cell.cell_contents
        if self._claim() and not already_stopping:
            previous(signum, frame)  # Dramatiq: "Stopping worker process...", then Worker.stop
            return
        first_at = self._first_at
        if first_at is None or time.monotonic() - first_at < SAME_REQUEST_S:
            return  # the process group's copy of the same request
        self._kill(f"{signal.Signals(signum).name} while stopping: exiting now")

    def _watch(self) -> None:
        self._requested.wait()
        time.sleep(self.deadline_s)
        self._kill(f"still stopping {self.deadline_s:g} s after the stop request: exiting now")

    def _kill(self, why: str) -> None:
        _logger.warning("Killing worker process: %s; unacked messages are redelivered.", why)
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:  # noqa: BLE001 - exiting regardless
                pass
        self._exit_process(RET_KILLED)
