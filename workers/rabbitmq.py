"""The RabbitMQ broker: Dramatiq's ``RabbitmqBroker`` on quorum queues, with publisher confirms.

Chosen by ``BILLING_BROKER_URL=amqp://user:pass@host:5672/vhost`` (or
``amqps://``); see docs/rabbitmq.md.  Same queue names, actors and JSON
envelope as on Redis: Dramatiq publishes each message to the default
exchange (``""``) with the queue's name as routing key.

What this adds to stock Dramatiq:

* every queue, its delay queue (``.DQ``) and its dead-letter queue
  (``.XQ``) is a durable **quorum queue** (``x-queue-type: quorum``;
  Dramatiq declares classic queues and its upstream pull requests for
  quorum queues were closed, so the ``_build_queue_arguments`` /
  ``_declare_*`` methods are overridden here);
* ``x-delivery-limit`` on the queue and the delay queue: a message returned
  to its queue more often than that (a worker that dies with it, every time)
  is dead-lettered to ``.XQ``, a second bound behind the PostgreSQL count
  of ``BILLING_MAX_DELIVERIES``.  Dead-lettering is ``at-least-once``
  (RabbitMQ >= 3.10), so a message over the limit is moved, never dropped;
* publisher confirms are on (``confirm_delivery=True``): ``enqueue``
  returns only once RabbitMQ has the message (persistent, ``delivery_mode``
  2, as Dramatiq publishes it), and raises when RabbitMQ refuses it;
* messages fetched from RabbitMQ are marked (:data:`FETCHED_OPTION`), so a
  retry or a delayed message moved to its queue keeps the signature it came
  with (:func:`tasks.signing.forwarding`);
* undecodable payloads are recorded (``undecodable_handler``) and then
  dead-lettered, not only logged;
* :meth:`_BillingRabbitmqConsumer.ack_many` for the batch queues.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import pika
import pika.exceptions
from dramatiq import Message
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer, _RabbitmqMessage
from dramatiq.common import dq_name, q_name, xq_name
from dramatiq.errors import ConnectionClosed, DecodeError

from tasks.signing import forwarding

__all__ = ["FETCHED_OPTION", "BillingRabbitmqBroker", "undecodable_id"]

#: Option the consumer sets on every message it fetched from RabbitMQ.  A
#: message carrying it is re-enqueued (retry, delayed message moved to its
#: queue) under :func:`tasks.signing.forwarding`: it keeps its signature and
#: is never signed with this process's key.  Set by the consumer itself, so
#: no fetched message can lack it; a producer that sets it only loses its
#: own signature.
FETCHED_OPTION = "billing_fetched"


def undecodable_id(properties: Any, body: bytes) -> str:
    """The id an undecodable payload is recorded under: its AMQP ``message_id``, else ``sha256:`` of the body.

    The hash makes the record of a payload delivered again (after a failed
    record) the same row.
    """
    message_id = getattr(properties, "message_id", None)
    if isinstance(message_id, str) and message_id:
        return message_id[:200]
    return "sha256:" + hashlib.sha256(body).hexdigest()[:32]


class _BillingRabbitmqConsumer(_RabbitmqConsumer):  # type: ignore[misc]
    """Dramatiq's RabbitMQ consumer that marks what it fetched, records undecodable payloads and acks in batches.

    Stock Dramatiq logs an undecodable payload and nacks it (dead-lettered to
    ``.XQ``), so operators never see it in ``failed_messages``.  Here
    ``broker.undecodable_handler`` records it first; when recording fails
    (PostgreSQL down) it is requeued after a pause and recorded on a later
    delivery, and the queue's ``x-delivery-limit`` dead-letters it after that
    many attempts at most.
    """

    def __next__(self) -> Any:
        try:
            method, properties, body = next(self.iterator)
            if method is None:
                return None
        except (AssertionError, pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as e:
            if getattr(e, "reply_code", None) == 404:
                self.broker.queues_pending.add(q_name(self.queue_name))
            raise ConnectionClosed(e) from None
        try:
            message = Message.decode(body)
        except DecodeError as exc:
            self._reject_undecodable(method.delivery_tag, properties, body, exc.error or exc)
            return None
        message.options[FETCHED_OPTION] = True
        self.known_tags.add(method.delivery_tag)
        return _RabbitmqMessage(method.redelivered, method.delivery_tag, message)

    def _reject_undecodable(self, tag: int, properties: Any, body: bytes, error: BaseException) -> None:
        """Record a payload that is not a Dramatiq message, then dead-letter it (``basic_nack``, no requeue).

        Runs on the consumer thread, which owns the channel, so it nacks directly.
        """
        payload_id = undecodable_id(properties, body)
        handler = self.broker.undecodable_handler
        try:
            if handler is not None:
                handler(self.queue_name, payload_id, body, error)
            else:
                self.logger.error(
                    "Dead-lettering undecodable payload %s on %r: %s", payload_id, self.queue_name, error
                )
        except Exception as exc:  # noqa: BLE001 - not recorded: try again later, never drop it
            self.logger.error("Could not record undecodable payload %s (%s); requeueing.", payload_id, exc)
            time.sleep(1.0)
            self._channel_call(self.channel.basic_nack, tag, requeue=True)
            return
        self._channel_call(self.channel.basic_nack, tag, requeue=False)

    def _channel_call(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as e:
            raise ConnectionClosed(e) from None

    def ack_many(self, messages: Sequence[Any]) -> None:
        """Acknowledge ``messages`` (fetched from this consumer's queue) in one hand-off to the connection's thread.

        One callback that sends a ``basic.ack`` per delivery tag.  Not one
        ``basic.ack`` with ``multiple=True``: that acknowledges every
        outstanding tag up to it on the channel, including messages other
        threads still run or are about to nack (dead-letter), which would
        then be acked instead.

        Raises:
          dramatiq.errors.ConnectionClosed: The channel or connection is closed.
        """
        tags = []
        for message in messages:
            try:
                self.known_tags.remove(message._tag)
            except KeyError:
                self.logger.warning("Failed to ack message: not in known tags.")
                continue
            tags.append(message._tag)
        if not tags:
            return
        try:
            self.connection.add_callback_threadsafe(partial(self._ack_tags, tags))
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as e:
            raise ConnectionClosed(e) from None

    def _ack_tags(self, tags: list[int]) -> None:
        for tag in tags:
            self.channel.basic_ack(tag)


class BillingRabbitmqBroker(RabbitmqBroker):  # type: ignore[misc]
    """Dramatiq's RabbitmqBroker on durable quorum queues, with confirms and a delivery limit (see the module).

    Parameters:
      url: ``amqp://user:pass@host:5672/vhost`` or ``amqps://...``
        (:class:`pika.URLParameters`; ``;`` separates several nodes).
      delivery_limit: ``x-delivery-limit`` of the queue and its delay queue:
        returns to the queue after which a message is dead-lettered to ``.XQ``.
      dead_message_ttl_ms: ``x-message-ttl`` of the dead-letter queue, in milliseconds.
      **kwargs: Passed to :class:`dramatiq.brokers.rabbitmq.RabbitmqBroker`
        (``confirm_delivery`` is always on; ``max_priority`` is refused:
        quorum queues have no ``x-max-priority``).

    Raises:
      ValueError: ``max_priority`` given, or a limit below 1.
    """

    #: How long an enqueue keeps trying while RabbitMQ is unreachable, in seconds.
    enqueue_patience_s: float = 300.0

    def __init__(
        self,
        *,
        url: str,
        delivery_limit: int = 20,
        dead_message_ttl_ms: int = 7 * 86_400_000,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("max_priority", None) is not None:
            raise ValueError("quorum queues do not support x-max-priority")
        if delivery_limit < 1:
            raise ValueError("delivery_limit must be 1 or more")
        kwargs["confirm_delivery"] = True
        super().__init__(url=url, **kwargs)
        self.delivery_limit = delivery_limit
        self.dead_message_ttl_ms = dead_message_ttl_ms
        #: Records payloads that are not Dramatiq messages (see _BillingRabbitmqConsumer); set by the worker.
        self.undecodable_handler: Any = None

    @property
    def consumer_class(self) -> type[_RabbitmqConsumer]:
        """Consumers that mark fetched messages, record undecodable payloads and ack in batches."""
        return _BillingRabbitmqConsumer

    # ------------------------------------------------------------------ queue declarations

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        """Arguments of a queue and of its delay queue: quorum, delivery limit, dead-lettered to ``.XQ``.

        No ``x-max-priority`` (quorum queues refuse it).  ``at-least-once``
        dead-lettering needs ``x-overflow: reject-publish``; no length limit
        is set, so nothing is rejected for it (RabbitMQ docs, "Dead Lettering",
        quorum queues, since 3.10).
        """
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": xq_name(queue_name),
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def _xq_arguments(self) -> dict[str, Any]:
        """Arguments of a dead-letter queue: quorum, messages kept ``dead_message_ttl_ms``."""
        return {"x-queue-type": "quorum", "x-message-ttl": self.dead_message_ttl_ms}

    def _declare_queue(self, queue_name: str, *, passive: bool = False) -> Any:
        return self.channel.queue_declare(
            queue=queue_name, durable=True, passive=passive, arguments=self._build_queue_arguments(queue_name)
        )

    def _declare_dq_queue(self, queue_name: str, *, passive: bool = False) -> Any:
        return self.channel.queue_declare(
            queue=dq_name(queue_name),
            durable=True,
            passive=passive,
            arguments=self._build_queue_arguments(queue_name),
        )

    def _declare_xq_queue(self, queue_name: str, *, passive: bool = False) -> Any:
        return self.channel.queue_declare(
            queue=xq_name(queue_name), durable=True, passive=passive, arguments=self._xq_arguments()
        )

    # ------------------------------------------------------------------ publishing

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """:meth:`RabbitmqBroker.enqueue` with confirms, retried while RabbitMQ is unreachable.

        Dramatiq tries a publish 6 times at once and raises; its Retries
        middleware enqueues a retry from ``after_process_message`` and only
        logs a failure there, after which the worker acks the original, so a
        short outage would lose a retry.  Like
        :meth:`workers.broker.BillingRedisBroker.enqueue`, this keeps trying
        for ``enqueue_patience_s``.  A message RabbitMQ refused (a
        ``basic.nack`` of the confirm: e.g. a queue at its length limit with
        ``reject-publish``) raises at once.

        A message fetched from RabbitMQ (it carries :data:`FETCHED_OPTION`)
        is enqueued under :func:`tasks.signing.forwarding`: it keeps the
        signature it came with.

        Raises:
          dramatiq.errors.ConnectionClosed: RabbitMQ stayed unreachable for
            ``enqueue_patience_s``, or refused the message (``message`` is
            the pika ``NackError``).
        """
        deadline = time.monotonic() + self.enqueue_patience_s
        pause = 0.05
        fetched = FETCHED_OPTION in message.options
        while True:
            try:
                if fetched:
                    with forwarding():
                        return super().enqueue(message, delay=delay)  # type: ignore[no-any-return]
                return super().enqueue(message, delay=delay)  # type: ignore[no-any-return]
            except ConnectionClosed as exc:
                if isinstance(exc.message, pika.exceptions.NackError):
                    raise
                if time.monotonic() + pause > deadline:
                    raise
                self.logger.warning(
                    "Enqueue of %r failed (%s); retrying in %.2f s.", message.message_id, exc, pause
                )
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    def enqueue_many(self, messages: Sequence[Message[Any]]) -> list[Message[Any]]:
        """Enqueue several messages on this thread's channel, each confirmed by RabbitMQ before the next.

        The same contract as :func:`tasks.producer.enqueue_many` on Redis
        (used by the scheduler): every message goes through the enqueue
        middleware (signing, or :func:`tasks.signing.forwarding` for one that
        came from RabbitMQ).  Pika's blocking channel waits for each
        publish's confirm, so this is one round trip per message.

        Returns:
          The enqueued messages, in order.

        Raises:
          dramatiq.errors.ConnectionClosed: As :meth:`enqueue`; the messages
            before the failing one are enqueued (enqueueing again is safe:
            consumers dedupe by idempotency key).
        """
        return [self.enqueue(message) for message in messages]

    # ------------------------------------------------------------------ reads for operators

    def queue_counts(self, queue_name: str) -> tuple[int, int, int]:
        """Ready messages of the queue, of its delay queue and of its dead-letter queue.

        Passive declares (``queue.declare`` with ``passive=True``): they read
        the counts and never create or change a queue.  RabbitMQ reports
        only messages ready for delivery; those a consumer holds unacked
        (in flight, or delayed messages a worker holds until their eta) are
        not in these counts, and a quorum queue's ``declare-ok`` reports no
        consumers, so none are returned.  A queue that does not exist counts 0.

        Raises:
          dramatiq.errors.ConnectionClosed: RabbitMQ could not be reached.
        """
        counts = []
        for declare in (self._declare_queue, self._declare_dq_queue, self._declare_xq_queue):
            try:
                frame = declare(queue_name, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise ConnectionClosed(exc) from None
                del self.channel
                counts.append(0)
                continue
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
                del self.connection
                raise ConnectionClosed(exc) from None
            counts.append(frame.method.message_count)
        return counts[0], counts[1], counts[2]
