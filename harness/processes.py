"""Processes of the harness: worker commands in their own process groups, in-process workers, signals.

Re-exported by :mod:`harness.services`, the one module the demo, chaos, the
bench and the tests bring their services up with.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import IO, Any

import redis

from .drain import NAMESPACE

__all__ = ["WorkerProcess", "inprocess_worker", "interrupt_on_sigterm", "kill_group", "worker_command"]

ROOT = Path(__file__).resolve().parent.parent


def kill_group(proc: Any, sig: int) -> None:
    """Send ``sig`` to the process group led by ``proc`` (anything with a ``pid``); gone is fine."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def worker_command(
    module: str = "workers.actors", *, processes: int = 1, threads: int = 1, queues: Sequence[str] = ()
) -> list[str]:
    """``python -m dramatiq MODULE --processes P --threads T [--queues ...]``."""
    argv = [
        sys.executable,
        "-m",
        "dramatiq",
        module,
        "--processes",
        str(processes),
        "--threads",
        str(threads),
    ]
    return argv + (["--queues", *queues] if queues else [])


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _status_kib(pid: int, field_name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class WorkerProcess:
    """One worker command (a Dramatiq master and its worker processes) in its own process group.

    Parameters:
      argv: The command (:func:`worker_command`, or ``billing worker ...``).
      env: Its whole environment.
      log: Where its output goes (a path, appended to; an open binary file;
        None: nowhere).
      name: Named in errors.
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        log: Path | IO[bytes] | None = None,
        name: str = "worker",
    ) -> None:
        self.argv = argv
        self.env = env
        self.log = log
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_ms = 0

    def start(self) -> WorkerProcess:
        """Start the command (from the project's root directory); returns self."""
        self.started_ms = int(time.time() * 1000)
        with ExitStack() as stack:
            out: Any = subprocess.DEVNULL
            if isinstance(self.log, Path):
                out = stack.enter_context(self.log.open("ab"))
            elif self.log is not None:
                out = self.log
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT if out is not subprocess.DEVNULL else subprocess.DEVNULL,
                start_new_session=True,  # its own process group: a signal takes master and children together
            )
        return self

    @property
    def pid(self) -> int:
        """The master's pid."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the master to exit; its exit status.

        Raises:
          subprocess.TimeoutExpired: Still running after ``timeout`` seconds.
        """
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def wait_ready(self, client: redis.Redis, processes: int, timeout_s: float = 90) -> None:
        """Until ``processes`` Dramatiq brokers started after us beat (their consumers are fetching).

        Raises:
          RuntimeError: The command exited, or did not get ready in time (its log's tail in the message).
        """
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while int(client.zcount(f"{NAMESPACE}:__heartbeats__", self.started_ms, "+inf")) < processes:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-1500:] if isinstance(self.log, Path) else ""
                raise RuntimeError(f"{self.name} workers did not start:\n{tail}")
            time.sleep(0.05)
        time.sleep(0.2)  # the other threads' first fetch

    def pids(self) -> set[int]:
        """The master and its worker processes."""
        if self.proc is None:
            return set()
        return {self.proc.pid, *_children(self.proc.pid)}

    def workers(self) -> list[int]:
        """The worker processes (the master's children)."""
        return _children(self.proc.pid) if self.proc is not None else []

    def peak_rss_kib(self) -> list[int]:
        """Peak resident set (``VmHWM``) of each worker process so far."""
        return [kib for pid in self.workers() if (kib := _status_kib(pid, "VmHWM")) is not None]

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM the group (Dramatiq's graceful stop), SIGKILL what is left after ``timeout_s``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            kill_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.proc, signal.SIGKILL)  # children that outlived the master, if any
        self.proc.wait()


def interrupt_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM raise ``KeyboardInterrupt``, so a run's exit stacks stop what it started; returns the undo."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def inprocess_worker(broker: Any, *, threads: int = 4, worker_timeout_ms: int = 100) -> Any:
    """A ``dramatiq.Worker`` over ``broker`` in this process (not started: call ``start()``)."""
    import dramatiq

    return dramatiq.Worker(broker, worker_threads=threads, worker_timeout=worker_timeout_ms)
