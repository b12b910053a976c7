"""``billing keys ...``: durable API key delivery (docs/operations.md "API key delivery").

* ``generate-keypair``: a recipient key pair (the public half goes in
  ``BILLING_KEY_DELIVERY_PUBLIC_KEY``, the private half to the consumer only);
* ``set-recipient``: an account's own public key, instead of the deployment's;
* ``fetch``: the consumer: read the pending deliveries sealed to a private
  key, print each opened key as one JSON line, acknowledge them;
* ``deliveries``: what is pending, acknowledged or superseded (no ciphertext).

The reissue of a managed key is an operator action: ``billing ops reissue-key``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from tasks.errors import ConfigurationError

from .common import json_text, now, print_table, run_services

__all__ = ["keys_app"]


@click.group("keys")
def keys_app() -> None:
    """Durable delivery of issued API keys: key pairs, recipients, the consumer."""


@keys_app.command("generate-keypair")
@click.option("--json", "as_json", is_flag=True)
def generate_keypair_command(as_json: bool) -> None:
    """Print a new X25519 key pair (base64): public for the worker, private for the consumer only."""
    from tasks.key_sealing import generate_keypair

    public, private = generate_keypair()
    if as_json:
        click.echo(json.dumps({"public_key": public, "private_key": private}))
        return
    click.echo(f"BILLING_KEY_DELIVERY_PUBLIC_KEY={public}")
    click.echo(f"# the consumer's private key: keep it out of the billing deployment\nPRIVATE_KEY={private}")


@keys_app.command("set-recipient")
@click.argument("account_id", metavar="ID")
@click.option("--public-key", "public_key", default=None, help="The account's X25519 public key (base64).")
@click.option("--clear", is_flag=True, help="Use the deployment's key again.")
def set_recipient_command(account_id: str, public_key: str | None, clear: bool) -> None:
    """Seal this account's keys to its own public key (or, with --clear, to the deployment's)."""
    if (public_key is None) == (not clear):
        raise click.UsageError("give exactly one of --public-key and --clear")
    from ..key_delivery import set_recipient

    run_services(
        lambda engine, broker: set_recipient(engine, account_id, None if clear else public_key, now=now())
    )
    click.echo(f"account {account_id}: keys sealed to {'the deployment key' if clear else 'its own key'}")


@keys_app.command("fetch")
@click.option(
    "--private-key-env",
    "private_key_env",
    required=True,
    help="Name of the environment variable holding the consumer's private key (base64).",
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--consumer", default="billing keys fetch", show_default=True, help="Kept as acknowledged_by.")
@click.option("--follow", is_flag=True, help="Keep fetching (every --interval-ms) until stopped.")
@click.option(
    "--interval-ms", "interval_ms", type=click.IntRange(100, None), default=2_000, show_default=True
)
def fetch_command(private_key_env: str, limit: int, consumer: str, follow: bool, interval_ms: int) -> None:
    """Open the pending deliveries sealed to a private key, print one JSON line each, acknowledge them.

    Each line: delivery_id, key_id, account_id, subscription_id, prefix,
    reason, key_status and api_key (the plaintext).  A delivery is
    acknowledged only after its line is written and flushed; if writing
    fails, nothing of that batch is acknowledged.
    """
    private_key = os.environ.get(private_key_env, "").strip()
    if not private_key:
        raise ConfigurationError(f"the environment variable {private_key_env} is empty or unset")
    from ..key_delivery import ConsumedKey, consume_deliveries

    async def hand_over(item: ConsumedKey) -> None:
        line = {
            "delivery_id": item.delivery_id,
            "key_id": item.key.key_id,
            "account_id": item.key.account_id,
            "subscription_id": item.key.subscription_id,
            "prefix": item.key.prefix,
            "reason": item.reason,
            "key_status": item.key_status,
            "api_key": item.key.api_key,
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    async def once(engine: Any, broker: Any) -> int:
        done = await consume_deliveries(
            engine, private_key, hand_over, consumer=consumer, now=now(), limit=limit
        )
        return len(done)

    while True:
        got = run_services(once)
        if not follow:
            return
        if got < limit:
            time.sleep(interval_ms / 1000)


@keys_app.command("deliveries")
@click.option("--account", "account_id", default=None, help="Account id.")
@click.option("--status", type=click.Choice(["pending", "acknowledged", "superseded"]), default=None)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def deliveries_command(account_id: str | None, status: str | None, limit: int, as_json: bool) -> None:
    """List key deliveries, newest first (never a ciphertext or a plaintext)."""
    from db.engine import transaction
    from db.key_delivery import list_deliveries

    async def go(engine: Any, broker: Any) -> list[dict[str, Any]]:
        async with transaction(engine) as conn:
            return await list_deliveries(conn, account_id=account_id, status=status, limit=limit)

    rows = run_services(go)
    if as_json:
        click.echo(json_text(rows))
        return
    print_table(
        "API key deliveries",
        rows,
        ["delivery_id", "key_id", "account_id", "reason", "status", "created_at", "deliver_by"],
    )
