#!/usr/bin/env python3
"""Publish one billing message to RabbitMQ with pika only: what a producer in any language does (docs/rabbitmq.md).

No code of this project is imported: the envelope, the signature and the
AMQP publish are written out here, so this is the recipe to port.

    export BILLING_BROKER_URL=amqp://user:pass@host:5672/vhost
    export BILLING_SIGNING_KEYS='{"k1": "a-secret-of-at-least-32-characters..."}'   # when the workers sign
    python examples/publish_amqp.py subscribe '{"account_id": "acct_1", "plan_id": "pro",
        "idempotency_key": "signup:acct_1:pro:1"}'

The publish: the default exchange ``""``, routing key = the queue name
(``billing``, ``billing.payments`` or ``billing.usage``), persistent
(``delivery_mode=2``), in confirm mode so that an enqueue counts only once
RabbitMQ has it.  The body is the same JSON envelope as on Redis, without
``options.redis_message_id``.  Prints the message id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import time
import uuid

import pika

#: The contract's queue of each actor (docs/contract.md).
QUEUES = {
    "subscribe": "billing",
    "renew": "billing",
    "revoke_key": "billing",
    "auto_top_up": "billing.payments",
    "record_usage": "billing.usage",
}


def signature(secret: str, key_id: str, actor_name: str, message_id: str, kwargs: dict) -> str:
    """``v1:{key_id}:{hex HMAC-SHA256}`` over ``[actor_name, message_id, kwargs]`` as canonical JSON."""
    canonical = json.dumps(
        [actor_name, message_id, kwargs], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    return f"v1:{key_id}:{hmac.new(secret.encode(), canonical, hashlib.sha256).hexdigest()}"


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in QUEUES:
        print(f"usage: {argv[0]} {{{','.join(QUEUES)}}} KWARGS_JSON", file=sys.stderr)
        return 2
    actor_name, kwargs = argv[1], json.loads(argv[2])
    queue = QUEUES[actor_name]
    message_id = str(uuid.uuid4())
    options: dict = {}
    keys = os.environ.get("BILLING_SIGNING_KEYS", "").strip()
    if keys:
        secrets = json.loads(keys)
        key_id = os.environ.get("BILLING_SIGNING_KEY_ID") or next(iter(secrets))
        options["billing_signature"] = signature(secrets[key_id], key_id, actor_name, message_id, kwargs)
    envelope = {
        "queue_name": queue,
        "actor_name": actor_name,
        "args": [],
        "kwargs": kwargs,
        "options": options,
        "message_id": message_id,
        "message_timestamp": int(time.time() * 1000),
    }
    connection = pika.BlockingConnection(pika.URLParameters(os.environ["BILLING_BROKER_URL"]))
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # basic_publish now waits for RabbitMQ's ack and raises on a nack
        channel.basic_publish(
            exchange="",
            routing_key=queue,
            body=json.dumps(envelope, separators=(",", ":")).encode(),
            properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
            mandatory=True,  # no such queue (no worker has declared it yet): UnroutableError, not a silent drop
        )
    finally:
        connection.close()
    print(message_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
