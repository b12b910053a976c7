"""API keys: issued with 256 bits of randomness, stored as their SHA-256 hash only."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from ..sql import statement

__all__ = ["hash_api_key", "insert_api_key"]

_INSERT_API_KEY = statement("insert_api_key")


def hash_api_key(plaintext: str) -> str:
    """SHA-256 hex digest of an API key (keys are 256-bit random, so a fast hash is enough)."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def _new_api_key() -> tuple[str, str]:
    prefix = "bq_" + secrets.token_hex(6)
    plaintext = f"{prefix}.{secrets.token_urlsafe(32)}"
    return prefix, plaintext


async def insert_api_key(
    conn: AsyncConnection, *, account_id: str, subscription_id: str | None, source: str, now: datetime
) -> tuple[str, str, str]:
    """Insert a new active API key (only its hash is stored); returns (key id, prefix, plaintext)."""
    key_id = "key_" + uuid.uuid4().hex
    prefix, plaintext = _new_api_key()
    await conn.execute(
        _INSERT_API_KEY,
        {
            "id": key_id,
            "account_id": account_id,
            "subscription_id": subscription_id,
            "source": source,
            "prefix": prefix,
            "key_hash": hash_api_key(plaintext),
            "now": now,
        },
    )
    return key_id, prefix, plaintext
