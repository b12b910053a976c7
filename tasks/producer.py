"""The producer API other Python services import to publish billing messages.

Messages are validated against the contract *before* anything is enqueued,
then written to Redis in Dramatiq's default namespace and JSON encoding, on
the contract's queue, so that any worker of this project picks them up::

    from tasks import Producer
    producer = Producer("redis://localhost:6379/0")
    producer.subscribe(account_id="acct_1", plan_id="pro", idempotency_key="signup:acct_1:pro:1")
    await producer.publish_async(RenewMessage(...))

Paired sync/async calls: :meth:`Producer.publish` / :meth:`Producer.publish_async`.

Configuration: a producer imports nothing of the workers, so it reads its
own two settings from the environment, ``BILLING_REDIS_URL`` (unless given a
URL or a broker) and the signing keys (:func:`tasks.signing.signing_keys_from_env`),
the same variables the workers read through their settings.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import dramatiq
import uuid_utils
from dramatiq.brokers.redis import RedisBroker

from .errors import ConfigurationError, MessageValidationError
from .messages import (
    AutoTopUpMessage,
    BillingMessage,
    RecordUsageMessage,
    RenewMessage,
    RevokeKeyMessage,
    SubscribeMessage,
    validate_message,
)
from .signing import SigningKeys, SigningMiddleware, forwarding, signing_keys_from_env

__all__ = ["Producer", "enqueue_many", "to_dramatiq_message"]


def to_dramatiq_message(message: BillingMessage, *, message_id: str | None = None) -> dramatiq.Message[Any]:
    """The Dramatiq message (queue, actor, keyword arguments) for a validated billing message."""
    return dramatiq.Message(
        queue_name=message.queue_name,
        actor_name=message.actor_name,
        args=(),
        kwargs=message.kwargs(),
        options={},
        message_id=message_id or str(uuid_utils.uuid4()),
    )


def enqueue_many(
    broker: RedisBroker, messages: Sequence[dramatiq.Message[Any]]
) -> list[dramatiq.Message[Any]]:
    """Enqueue several messages on a Dramatiq Redis broker in one round trip: two commands per queue.

    What Dramatiq's ``enqueue`` command does for one message (``HSET`` of
    the body in ``{namespace}:{queue}.msgs``, then ``RPUSH`` of its id on
    ``{namespace}:{queue}``; see ``dispatch.lua``), done for the whole
    batch as one ``HSET`` and one ``RPUSH`` per queue inside
    ``MULTI``/``EXEC``: every body is stored before its id can be popped,
    and Redis runs two commands instead of a thousand scripts.  Each
    message gets a fresh ``redis_message_id`` and goes through the
    broker's enqueue middleware hooks (signing, or not for one that came
    from Redis: :func:`tasks.signing.forwarding`) like ``enqueue``.  No
    delay is supported.  Unlike the script, this writes no heartbeat: a
    producer is not a worker.

    Parameters:
      broker: A Dramatiq ``RedisBroker`` (its client, namespace and middleware).
      messages: Messages built with their queue, actor, keyword arguments and message id.

    Returns:
      The enqueued messages (with their Redis ids), in order.

    Raises:
      redis.RedisError: Nothing of the batch was enqueued (the transaction
        did not run) or, if the reply was lost, all of it was; enqueueing
        again is safe: consumers dedupe by idempotency key.
    """
    enqueued = []
    bodies: dict[str, dict[str, bytes]] = {}
    for original in messages:
        message = original.copy(options={"redis_message_id": str(uuid_utils.uuid4())})
        if "redis_message_id" in original.options:  # came from Redis: keeps its signature
            with forwarding():
                broker.emit_before("enqueue", message, None)
        else:
            broker.emit_before("enqueue", message, None)
        bodies.setdefault(message.queue_name, {})[message.options["redis_message_id"]] = message.encode()
        enqueued.append(message)
    if bodies:
        with broker.client.pipeline(transaction=True) as pipe:
            for queue_name, by_id in bodies.items():
                pipe.hset(f"{broker.namespace}:{queue_name}.msgs", mapping=by_id)  # type: ignore[arg-type]
                pipe.rpush(f"{broker.namespace}:{queue_name}", *by_id)
            pipe.execute()
    for message in enqueued:
        broker.emit_after("enqueue", message, None)
    return enqueued


class Producer:
    """Publishes validated billing messages to Redis.

    Parameters:
      redis_url: ``redis://host:port/db``; defaults to ``BILLING_REDIS_URL``.
      broker: A ready Dramatiq broker instead of a URL (tests, in-process use).
      signing_keys: Sign every message (:mod:`tasks.signing`); defaults to
        ``BILLING_SIGNING_KEYS`` / ``BILLING_SIGNING_KEY_ID`` when this
        producer makes its own broker.  A given broker signs if it carries a
        :class:`~tasks.signing.SigningMiddleware`.

    Raises:
      ConfigurationError: Neither a URL, ``BILLING_REDIS_URL`` nor a broker, or bad signing keys.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        broker: dramatiq.Broker | None = None,
        signing_keys: SigningKeys | None = None,
    ) -> None:
        if broker is None:
            url = redis_url or os.environ.get("BILLING_REDIS_URL")
            if not url:
                raise ConfigurationError("BILLING_REDIS_URL is not set (redis://host:port/db)")
            broker = RedisBroker(url=url)
            signing_keys = signing_keys or signing_keys_from_env()
        if signing_keys is not None:
            broker.add_middleware(SigningMiddleware(signing_keys))
        self.broker = broker

    def publish(self, message: BillingMessage, *, message_id: str | None = None) -> str:
        """Enqueue one validated message. Returns the Dramatiq message id."""
        return self.broker.enqueue(to_dramatiq_message(message, message_id=message_id)).message_id

    def publish_many(self, messages: Iterable[BillingMessage]) -> list[str]:
        """Enqueue validated messages, each its own message: one Redis round trip on a Redis broker.

        Returns:
          The Dramatiq message ids, in order.

        Raises:
          redis.RedisError: Nothing was enqueued, or (reply lost) all was;
            publishing the batch again is safe (consumers dedupe by key).
        """
        built = [to_dramatiq_message(m) for m in messages]
        if isinstance(self.broker, RedisBroker):
            return [m.message_id for m in enqueue_many(self.broker, built)]
        return [self.broker.enqueue(m).message_id for m in built]

    async def publish_async(self, message: BillingMessage, *, message_id: str | None = None) -> str:
        """:meth:`publish` without blocking the event loop."""
        return await asyncio.to_thread(self.publish, message, message_id=message_id)

    def publish_raw(self, actor_name: str, kwargs: dict[str, Any]) -> str:
        """Validate plain keyword arguments for ``actor_name`` and enqueue them.

        Raises:
          MessageValidationError: The arguments break the contract; nothing is enqueued.
        """
        return self.publish(validate_message(actor_name, kwargs))

    # -- one call per actor ---------------------------------------------------

    def subscribe(self, *, account_id: str, plan_id: str, idempotency_key: str) -> str:
        """Publish ``subscribe``."""
        return self.publish(
            SubscribeMessage(account_id=account_id, plan_id=plan_id, idempotency_key=idempotency_key)
        )

    def renew(self, *, subscription_id: str, period_start: datetime | str, idempotency_key: str) -> str:
        """Publish ``renew`` for the period starting at ``period_start`` (UTC)."""
        return self.publish(
            RenewMessage.model_validate(
                {
                    "subscription_id": subscription_id,
                    "period_start": period_start,
                    "idempotency_key": idempotency_key,
                }
            )
        )

    def auto_top_up(
        self,
        *,
        account_id: str,
        idempotency_key: str,
        amount_micros: int | None = None,
        reason: str | None = None,
    ) -> str:
        """Publish ``auto_top_up`` (``amount_micros`` defaults to the account's setting)."""
        return self.publish(
            AutoTopUpMessage(
                account_id=account_id,
                idempotency_key=idempotency_key,
                amount_micros=amount_micros,
                reason=reason,
            )
        )

    def revoke_key(
        self,
        *,
        reason: str,
        idempotency_key: str,
        key_id: str | None = None,
        subscription_id: str | None = None,
    ) -> str:
        """Publish ``revoke_key`` for one key or a subscription's managed keys."""
        return self.publish(
            RevokeKeyMessage(
                key_id=key_id, subscription_id=subscription_id, reason=reason, idempotency_key=idempotency_key
            )
        )

    def record_usage(
        self,
        *,
        account_id: str,
        amount_micros: int,
        idempotency_key: str,
        meter: str | None = None,
        quantity: int | None = None,
        occurred_at: datetime | str | None = None,
    ) -> str:
        """Publish ``record_usage``: debit ``amount_micros`` (integer micros) of usage, once per ``idempotency_key``."""
        return self.publish(
            RecordUsageMessage.model_validate(
                {
                    "account_id": account_id,
                    "amount_micros": amount_micros,
                    "idempotency_key": idempotency_key,
                    "meter": meter,
                    "quantity": quantity,
                    "occurred_at": occurred_at,
                }
            )
        )

    def record_usage_many(self, events: Iterable[RecordUsageMessage | dict[str, Any]]) -> list[str]:
        """Publish many ``record_usage`` events in one Redis round trip, each its own message with its own key.

        Parameters:
          events: :class:`RecordUsageMessage` instances or their keyword
            arguments (``account_id``, ``amount_micros``, ``idempotency_key``,
            optional ``meter``, ``quantity``, ``occurred_at``).

        Returns:
          The Dramatiq message ids, in order.

        Raises:
          MessageValidationError: An event breaks the contract (named by its
            position); nothing of the batch is enqueued.
          redis.RedisError: As :meth:`publish_many`.
        """
        messages: list[BillingMessage] = []
        for i, event in enumerate(events):
            if isinstance(event, RecordUsageMessage):
                messages.append(event)
                continue
            try:
                messages.append(validate_message(RecordUsageMessage.actor_name, event))
            except MessageValidationError as exc:
                raise MessageValidationError(f"event {i}: {exc.message}") from exc
        return self.publish_many(messages)
