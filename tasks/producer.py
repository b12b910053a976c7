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
from datetime import datetime
from typing import Any

import dramatiq
import uuid_utils
from dramatiq.brokers.redis import RedisBroker

from .errors import ConfigurationError
from .messages import (
    AutoTopUpMessage,
    BillingMessage,
    RenewMessage,
    RevokeKeyMessage,
    SubscribeMessage,
    validate_message,
)
from .signing import SigningKeys, SigningMiddleware, signing_keys_from_env

__all__ = ["Producer", "to_dramatiq_message"]


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
