"""OutboxSweeper: relays outbox messages left behind by a worker that died after commit."""

from __future__ import annotations

import threading
from collections.abc import Callable, Coroutine
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

__all__ = ["OutboxSweeper"]


class OutboxSweeper(Middleware):
    """Every ``interval_ms``, relay outbox rows older than ``older_than_ms``.

    Every worker process runs one; rows are claimed with ``FOR UPDATE SKIP
    LOCKED`` so sweepers never relay the same row at once (and a relay that
    does happen twice is harmless: same message id, same idempotency key).

    Parameters:
      sweep: Coroutine function ``sweep(older_than_s) -> int``, run on the
        AsyncIO middleware's event loop.
      interval_ms: Pause between sweeps, in milliseconds.
      older_than_ms: Age after which a row counts as left behind, in milliseconds.
    """

    def __init__(
        self, sweep: Callable[[float], Coroutine[Any, Any, int]], *, interval_ms: int, older_than_ms: int
    ) -> None:
        self.sweep = sweep
        self.interval_ms = interval_ms
        self.older_than_ms = older_than_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="outbox-sweeper", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        from dramatiq.asyncio import get_event_loop_thread

        while not self._stop.wait(self.interval_ms / 1000):
            loop_thread = get_event_loop_thread()
            if loop_thread is None:
                continue
            try:
                loop_thread.run_coroutine(self.sweep(self.older_than_ms / 1000))
            except Exception:  # noqa: BLE001 - keep sweeping; the next pass retries
                continue
