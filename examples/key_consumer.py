#!/usr/bin/env python3
"""A consumer of durable API key deliveries, with asyncpg and PyNaCl only (docs/operations.md, "API key delivery").

The billing worker seals every issued managed key to your X25519 public key
and keeps the ciphertext in PostgreSQL (``api_key_deliveries``) until you
acknowledge it.  This program is the other end: it holds the private key,
reads the pending deliveries sealed to it, opens and checks each one, hands
it over (here: one JSON line on stdout), and acknowledges it, all in one
transaction.  A crash before commit acknowledges nothing: the deliveries
are read again next time, so hand-over must be idempotent by ``key_id``.

    billing keys generate-keypair        # public half -> BILLING_KEY_DELIVERY_PUBLIC_KEY of the workers
    export KEY_CONSUMER_PRIVATE_KEY=...  # private half -> here only
    python examples/key_consumer.py --database-url postgresql://... --once
    python examples/key_consumer.py --database-url postgresql://...   # LISTEN and keep going

Each line: ``{"delivery_id", "key_id", "account_id", "subscription_id",
"prefix", "reason", "key_status", "api_key"}``.  The plaintext never goes
back to the database: the acknowledgement drops the ciphertext too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import sys

import asyncpg
from nacl.public import PrivateKey, SealedBox

CHANNEL = "billing_api_key_deliveries"  # NOTIFY payload: a delivery id, sent on commit

FETCH = """
    SELECT d.id, d.key_id, d.reason, d.sealed_box, d.created_at, k.key_hash, k.status AS key_status
    FROM api_key_deliveries d JOIN api_keys k ON k.id = d.key_id
    WHERE d.status = 'pending' AND d.recipient_public_key = $1
    ORDER BY d.created_at, d.id LIMIT $2
    FOR UPDATE OF d SKIP LOCKED
"""
ACKNOWLEDGE = """
    UPDATE api_key_deliveries SET status = 'acknowledged', sealed_box = NULL, acknowledged_at = now(),
        acknowledged_by = $2
    WHERE id = ANY($1::text[]) AND status = 'pending'
"""


def open_delivery(box: SealedBox, row: asyncpg.Record) -> dict[str, object]:
    """Open one delivery and check it against its row; raises ValueError if it does not match."""
    document = json.loads(box.decrypt(bytes(row["sealed_box"])))
    if document.get("v") != 1 or document["key_id"] != row["key_id"]:
        raise ValueError(f"delivery {row['id']}: the sealed document does not name key {row['key_id']}")
    if hashlib.sha256(document["api_key"].encode()).hexdigest() != row["key_hash"]:
        raise ValueError(f"delivery {row['id']}: the sealed key does not match api_keys.key_hash")
    return {
        "delivery_id": row["id"],
        "key_id": document["key_id"],
        "account_id": document["account_id"],
        "subscription_id": document["subscription_id"],
        "prefix": document["prefix"],
        "reason": row["reason"],
        "key_status": row["key_status"],
        "api_key": document["api_key"],
    }


def hand_over(item: dict[str, object]) -> None:
    """Give the key to whoever needs it.  Replace this: store it in your secret manager, show it once..."""
    sys.stdout.write(json.dumps(item) + "\n")
    sys.stdout.flush()


async def consume_once(
    conn: asyncpg.Connection, private_key: PrivateKey, *, consumer: str, limit: int
) -> int:
    """Fetch, open, hand over and acknowledge one batch in one transaction. Returns how many."""
    recipient = base64.b64encode(bytes(private_key.public_key)).decode()
    box = SealedBox(private_key)
    async with conn.transaction():
        rows = await conn.fetch(FETCH, recipient, limit)
        for row in rows:
            hand_over(open_delivery(box, row))
        await conn.execute(ACKNOWLEDGE, [r["id"] for r in rows], consumer)
    return len(rows)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--database-url", default=os.environ.get("BILLING_DATABASE_URL", ""))
    parser.add_argument("--private-key-env", default="KEY_CONSUMER_PRIVATE_KEY")
    parser.add_argument("--consumer", default="examples/key_consumer.py")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--once", action="store_true", help="one pass over what is pending, then exit")
    parser.add_argument("--poll-s", type=float, default=30.0, help="with no NOTIFY, look again this often")
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url (or BILLING_DATABASE_URL) is required")
    secret = os.environ.get(args.private_key_env, "").strip()
    if not secret:
        parser.error(f"the environment variable {args.private_key_env} (the private key, base64) is empty")
    private_key = PrivateKey(base64.b64decode(secret, validate=True))
    url = args.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(url)
    try:
        if args.once:
            while (
                await consume_once(conn, private_key, consumer=args.consumer, limit=args.limit) == args.limit
            ):
                pass
            return 0
        wake = asyncio.Event()
        await conn.add_listener(CHANNEL, lambda *_: wake.set())
        while True:
            wake.clear()  # before the pass: a NOTIFY during it wakes the next one at once
            while (
                await consume_once(conn, private_key, consumer=args.consumer, limit=args.limit) == args.limit
            ):
                pass
            try:
                await asyncio.wait_for(wake.wait(), timeout=args.poll_s)
            except TimeoutError:
                pass
    finally:
        await conn.close()


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
