"""The Dramatiq broker: Redis (default namespace, JSON encoding) or RabbitMQ, AsyncIO for async actors.

:func:`make_broker` picks the broker from the URL: ``redis://`` (or
``rediss://``, ``unix://``) builds :class:`BillingRedisBroker`, ``amqp://``
(or ``amqps://``) :class:`workers.rabbitmq.BillingRabbitmqBroker`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import redis
from dramatiq import Message, set_encoder
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import (
    MAINTENANCE_COMMAND_BLACKLIST,
    MAINTENANCE_SCALE,
    RedisBroker,
    _RedisConsumer,
)
from dramatiq.common import compute_backoff, current_millis, dq_name
from dramatiq.encoder import JSONEncoder
from dramatiq.errors import ConnectionClosed, DecodeError
from dramatiq.middleware import AsyncIO, CurrentMessage

from tasks.errors import ConfigurationError
from tasks.producer import enqueue_many
from tasks.signing import SigningMiddleware, forwarding

from .rabbitmq import BillingRabbitmqBroker
from .settings import RABBITMQ_SCHEMES, REDIS_SCHEMES, Settings

__all__ = [
    "BillingBroker",
    "BillingRedisBroker",
    "EnvelopeCheckingEncoder",
    "make_broker",
    "BROKER_URL_ENV",
    "REDIS_URL_ENV",
    "UndecodableHandler",
]

REDIS_URL_ENV = "BILLING_REDIS_URL"
BROKER_URL_ENV = "BILLING_BROKER_URL"

#: ``handler(queue_name, redis_message_id, payload, error)``: records a payload
#: Dramatiq could not decode; raises if it could not be recorded.
UndecodableHandler = Callable[[str, str, bytes, BaseException], None]


class EnvelopeCheckingEncoder(JSONEncoder):  # type: ignore[misc]
    """Dramatiq's JSON encoder whose ``decode`` also checks the message envelope.

    Dramatiq builds a ``Message`` from whatever JSON object it fetched, so an
    envelope whose ``kwargs`` is a list or whose ``options`` lack the Redis
    id fails later, outside any actor (a retried ``TypeError``, or a crashed
    consumer).  Here such a payload fails to decode, and the consumer
    records and dead-letters it (see :class:`_BillingConsumer`).

    Parameters:
      require_redis_id: Refuse an envelope without ``options.redis_message_id``
        (a string), which Dramatiq's Redis broker writes on every enqueue and
        :class:`BillingRedisBroker` relies on (acks, forwarding of signatures).
        True on Redis; False on RabbitMQ, whose messages have no Redis id
        (its consumer marks what it fetched instead: :data:`workers.rabbitmq.FETCHED_OPTION`).

    Raises:
      dramatiq.errors.DecodeError: Not UTF-8 JSON, not an object, a missing
        or unknown field, or a field of the wrong type.
    """

    def __init__(self, *, require_redis_id: bool = True) -> None:
        super().__init__()
        self.require_redis_id = require_redis_id

    #: field -> (type, required)
    FIELDS: dict[str, tuple[type | tuple[type, ...], bool]] = {
        "queue_name": (str, True),
        "actor_name": (str, True),
        "args": (list, True),
        "kwargs": (dict, True),
        "options": (dict, True),
        "message_id": (str, False),
        "message_timestamp": (int, False),
    }

    #: Dramatiq's encoding (``json.dumps(data, separators=(",", ":"))``), with the encoder built once.
    _JSON = json.JSONEncoder(separators=(",", ":"))

    def encode(self, data: Any) -> bytes:
        """The message as compact JSON (UTF-8), byte for byte as Dramatiq's ``JSONEncoder`` writes it."""
        return self._JSON.encode(data).encode("utf-8")

    def decode(self, data: bytes) -> Any:
        fields = super().decode(data)
        if not isinstance(fields, dict):
            raise DecodeError(f"envelope is a JSON {type(fields).__name__}, not an object", data, None)
        unknown = sorted(set(fields) - set(self.FIELDS))
        if unknown:
            raise DecodeError(f"unknown envelope fields {unknown[:5]}", data, None)
        for name, (kind, required) in self.FIELDS.items():
            if name not in fields:
                if required:
                    raise DecodeError(f"envelope field {name!r} is missing", data, None)
            elif not isinstance(fields[name], kind) or isinstance(fields[name], bool):
                raise DecodeError(
                    f"envelope field {name!r} is a {type(fields[name]).__name__}, not a {kind.__name__}",  # type: ignore[union-attr]
                    data,
                    None,
                )
        if self.require_redis_id and not isinstance(fields["options"].get("redis_message_id"), str):
            raise DecodeError("envelope options lack the Redis message id", data, None)
        return fields


#: ``ack`` of Dramatiq's dispatch script for many messages at once.  KEYS: the
#: heartbeats, this worker's acknowledgement set of the queue, the queue's
#: message bodies; ARGV: the time (ms), this worker's id, the Redis message ids.
ACK_MANY_SCRIPT = """
redis.call("zadd", KEYS[1], ARGV[1], ARGV[2])
for i = 3, #ARGV do
    if redis.call("srem", KEYS[2], ARGV[i]) > 0 then
        redis.call("hdel", KEYS[3], ARGV[i])
    end
end
"""


class _BillingConsumer(_RedisConsumer):  # type: ignore[misc]
    """Dramatiq's Redis consumer that does not strand a delay queue's messages on a connection error.

    A worker holds the retries it fetched from a delay queue (``billing.DQ``)
    in memory until their eta.  On a Redis connection error Dramatiq's
    consumer thread drops that memory, while the messages' ids stay in this
    worker's acknowledgement set in Redis: nothing delivers them again until
    the worker process dies (upstream: Bogdanp/dramatiq issue #527).  This consumer remembers the Redis ids it handed out and not yet
    acked or nacked; when a delay queue's consumer closes with some left,
    the broker keeps them, and the next consumer of that queue requeues them
    (the ``requeue`` command of Dramatiq's script) as soon as Redis answers.
    A message requeued while it was being moved to its queue is delivered
    twice: harmless, the consumer dedupes by idempotency key.
    """

    def __init__(self, broker: Any, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self.redis_ids: dict[str, str] = {}

    def __next__(self) -> Any:
        stranded = self.broker.stranded.get(self.queue_name)
        if stranded:
            try:
                self.broker.do_requeue(self.queue_name, *sorted(stranded))
                self.logger.warning("Requeued %d delayed messages held before a reconnect.", len(stranded))
                stranded.clear()
            except redis.RedisError:
                pass  # Redis still down: try again on the next poll
        try:
            proxy = self._next()
        except DecodeError as exc:
            try:
                self._reject_undecodable(exc.data, exc.error)
            except redis.ConnectionError as conn_exc:
                raise ConnectionClosed(conn_exc) from None
            return None
        if proxy is not None:
            self.redis_ids[proxy.message_id] = proxy.options["redis_message_id"]
        return proxy

    #: First pause after an empty fetch, in milliseconds; it doubles with each empty fetch in a row, up to
    #: the consumer's timeout (Dramatiq's starts at 5 to 10 ms, which is most of a busy queue's latency).
    POLL_MIN_MS = 1

    def _next(self) -> Any:
        """:meth:`_RedisConsumer.__next__` with a shorter first pause after an empty fetch.

        Dramatiq's consumer sleeps ``compute_backoff(misses)`` after each
        empty fetch: 5 to 10 ms, then 10 to 20, 20 to 40 and so on up to the
        timeout.  On a queue that is busy but drained by every fetch, the
        next message waits out that first pause.  Here the pause starts at
        :data:`POLL_MIN_MS` (1 to 2 ms with the same jitter) and doubles in
        the same way, so an idle queue still settles at one fetch per
        timeout after a dozen empty fetches.  The rest is Dramatiq's code.
        """
        try:
            while True:
                try:
                    data = self.message_cache.pop(0)
                    if data is None:  # pragma: no cover - Dramatiq's guard (its issue #266)
                        continue
                    self.misses = 0
                    message = Message.decode(data)
                    self.queued_message_ids.add(message.message_id)
                    return MessageProxy(message)
                except IndexError:
                    messages = []
                    if self.outstanding_message_count < self.prefetch:
                        self.message_cache = messages = self.broker.do_fetch(
                            self.queue_name, self.prefetch - self.outstanding_message_count
                        )
                    if not messages:
                        self.misses, backoff_ms = compute_backoff(
                            self.misses, factor=self.POLL_MIN_MS, max_backoff=self.timeout
                        )
                        time.sleep(backoff_ms / 1000)
                        return None
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None

    def _reject_undecodable(self, data: bytes, error: BaseException) -> None:
        """Dead-letter a payload that is not a Dramatiq message, after the broker's handler recorded it.

        Stock Dramatiq raises the decode error out of the consumer, whose
        thread restarts while the payload's id stays in this worker's
        acknowledgement set: nobody sees it until the worker dies, then it
        is redelivered and fails again.  Here the payload's Redis id is
        found among this worker's unacknowledged ids (one extra round trip,
        on this error path only), ``broker.undecodable_handler`` records it
        for operators, and it is nacked into Dramatiq's dead-letter queue.
        If recording fails (PostgreSQL down) it is requeued after a pause
        and recorded on a later delivery.
        """
        broker = self.broker
        acks = f"{broker.namespace}:__acks__.{broker.broker_id}.{self.queue_name}"
        held = set(self.redis_ids.values())
        candidates = [i.decode() for i in broker.client.smembers(acks) if i.decode() not in held]
        redis_id = None
        if candidates:
            payloads = broker.client.hmget(f"{broker.namespace}:{self.queue_name}.msgs", candidates)
            redis_id = next((i for i, p in zip(candidates, payloads, strict=True) if p == data), None)
        if redis_id is None:  # pragma: no cover - the payload vanished (acked by maintenance meanwhile)
            self.logger.error("Undecodable payload on %r not found in the ack set.", self.queue_name)
            return
        handler = broker.undecodable_handler
        try:
            if handler is not None:
                handler(self.queue_name, redis_id, data, error)
            else:
                self.logger.error(
                    "Dead-lettering undecodable payload %s on %r: %s", redis_id, self.queue_name, error
                )
        except Exception as exc:  # noqa: BLE001 - not recorded: try again later, never drop it
            self.logger.error("Could not record undecodable payload %s (%s); requeueing.", redis_id, exc)
            time.sleep(1.0)
            broker.do_requeue(self.queue_name, redis_id)
            return
        broker.do_nack(self.queue_name, redis_id)

    def ack(self, message: Any) -> None:
        try:
            super().ack(message)
        finally:
            self.redis_ids.pop(message.message_id, None)

    def ack_many(self, messages: Sequence[Any]) -> None:
        """Acknowledge ``messages`` (fetched from this consumer's queue) in one round trip to Redis.

        The ``ack`` command of Dramatiq's script for each of them, in one
        script call (:data:`ACK_MANY_SCRIPT`): the same keys, the same
        heartbeat.

        Raises:
          dramatiq.errors.ConnectionClosed: Redis could not be reached (none of them is acked).
        """
        if not messages:
            return
        broker = self.broker
        namespace, queue = broker.namespace, self.queue_name
        try:
            broker.ack_many_script(
                keys=[
                    f"{namespace}:__heartbeats__",
                    f"{namespace}:__acks__.{broker.broker_id}.{queue}",
                    f"{namespace}:{queue}.msgs",
                ],
                args=[current_millis(), broker.broker_id, *(m.options["redis_message_id"] for m in messages)],
            )
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None
        for message in messages:
            self.queued_message_ids.discard(message.message_id)
            self.redis_ids.pop(message.message_id, None)

    def nack(self, message: Any) -> None:
        try:
            super().nack(message)
        finally:
            self.redis_ids.pop(message.message_id, None)

    def requeue(self, messages: Any) -> None:
        messages = list(messages)
        super().requeue(messages)
        for message in messages:
            self.redis_ids.pop(message.message_id, None)

    def close(self) -> None:
        if self.queue_name.endswith(".DQ") and self.redis_ids:
            self.broker.stranded.setdefault(self.queue_name, set()).update(self.redis_ids.values())
            self.redis_ids.clear()
        super().close()


class BillingRedisBroker(RedisBroker):
    """Dramatiq's RedisBroker whose maintenance also runs on a timer, per queue.

    Stock Dramatiq requeues a dead worker's messages only on a maintenance
    pass drawn at random on 0.1% of commands, and a pass only requeues the
    messages of the queue whose command carried it; on a quiet queue that
    can take hours.  This broker also runs maintenance on a queue's command
    when ``maintenance_interval_ms`` has passed since this process last did
    for that queue.  Every worker polls each of its queues (and their delay
    queues) at least once a second when idle, so a message held by a dead
    worker comes back within ``heartbeat_timeout + maintenance_interval``
    (plus one poll).

    Parameters:
      maintenance_interval_ms: Longest gap between two maintenance passes of
        one process on one queue, in milliseconds.
      **kwargs: Passed to :class:`dramatiq.brokers.redis.RedisBroker`.
    """

    def __init__(self, *, maintenance_interval_ms: int = 5_000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.maintenance_interval_ms = maintenance_interval_ms
        self._last_maintenance: dict[str, float] = {}
        self._random = random.Random()
        #: Delay-queue name -> Redis ids a closed consumer still held (see _BillingConsumer).
        self.stranded: dict[str, set[str]] = {}
        #: Records payloads that are not Dramatiq messages (see _BillingConsumer); set by the worker.
        self.undecodable_handler: UndecodableHandler | None = None
        self.ack_many_script = self.client.register_script(ACK_MANY_SCRIPT)

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        """Consumers that requeue what a connection error would strand."""
        return _BillingConsumer

    def _maintenance_due(self, command: str, queue_name: str) -> int:
        if command in MAINTENANCE_COMMAND_BLACKLIST:
            return 0
        now = time.monotonic()
        due = (now - self._last_maintenance.get(queue_name, 0.0)) * 1000 >= self.maintenance_interval_ms
        if due or self._random.randint(1, MAINTENANCE_SCALE) <= self.maintenance_chance:
            self._last_maintenance[queue_name] = now
            return 1
        return 0

    def _dispatch(self, command: str) -> Any:
        # RedisBroker._dispatch with the maintenance flag decided per queue
        # (its own _should_do_maintenance does not see the queue name).
        dispatch = self.scripts["dispatch"]
        keys = [self.namespace]

        def do_dispatch(queue_name: str, *args: Any) -> Any:
            return dispatch(
                args=[
                    command,
                    current_millis(),
                    queue_name,
                    self.broker_id,
                    self.heartbeat_timeout,
                    self.dead_message_ttl,
                    self._maintenance_due(command, queue_name),
                    self._max_unpack_size(),
                    *args,
                ],
                keys=keys,
            )

        return do_dispatch

    #: How long an enqueue keeps trying while Redis is unreachable, in seconds.
    enqueue_patience_s: float = 300.0

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """:meth:`RedisBroker.enqueue`, retried while Redis is unreachable (up to ``enqueue_patience_s``).

        Dramatiq's Retries middleware enqueues a message's retry from inside
        ``after_process_message`` and only logs a failure there, after which the
        worker acks the original: with Redis down for a moment, a message
        that failed transiently was lost (no retry, no record; upstream:
        Bogdanp/dramatiq PR #545).  Like Dramatiq's own acks,
        an enqueue now waits for Redis instead.  An enqueue that reached
        Redis but lost its reply is sent twice: harmless, the consumer
        dedupes by idempotency key.

        A message that came from Redis (it carries ``options.redis_message_id``:
        Dramatiq moving a delayed message to its queue, or retrying one) is
        enqueued under :func:`tasks.signing.forwarding`: it keeps the
        signature it came with, and is never signed with this process's key.

        Raises:
          redis.ConnectionError / redis.TimeoutError: Redis stayed unreachable for ``enqueue_patience_s``.
        """
        deadline = time.monotonic() + self.enqueue_patience_s
        pause = 0.05
        fetched = "redis_message_id" in message.options
        while True:
            try:
                if fetched:
                    with forwarding():
                        return super().enqueue(message, delay=delay)
                return super().enqueue(message, delay=delay)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() + pause > deadline:
                    raise
                self.logger.warning(
                    "Enqueue of %r failed (%s); retrying in %.2f s.", message.message_id, exc, pause
                )
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    def enqueue_many(self, messages: Sequence[Message[Any]]) -> list[Message[Any]]:
        """Enqueue several messages in one round trip to Redis (:func:`tasks.producer.enqueue_many`)."""
        return enqueue_many(self, messages)

    def held(self, queue_name: str, redis_message_ids: Sequence[str]) -> set[str]:
        """Which of these messages Redis still holds on ``queue_name``: ready, in flight or delayed.

        A message's body stays in ``{namespace}:{queue}.msgs`` (or the delay
        queue's ``.DQ.msgs``) from its enqueue until a worker acknowledges it
        (dead-lettered ones move to ``.XQ.msgs``), so a message not found is
        processed, dead-lettered or lost.  One pipelined round trip.

        Parameters:
          redis_message_ids: The ``redis_message_id`` options the messages were enqueued with.

        Raises:
          redis.RedisError: Redis could not be reached.
        """
        if not redis_message_ids:
            return set()
        ready, delayed = f"{self.namespace}:{queue_name}.msgs", f"{self.namespace}:{dq_name(queue_name)}.msgs"
        with self.client.pipeline(transaction=False) as pipe:
            for redis_id in redis_message_ids:
                pipe.hexists(ready, redis_id)
                pipe.hexists(delayed, redis_id)
            found = pipe.execute()
        return {
            redis_id
            for redis_id, in_ready, in_delayed in zip(redis_message_ids, found[::2], found[1::2], strict=True)
            if in_ready or in_delayed
        }


#: Either broker :func:`make_broker` builds.
BillingBroker = BillingRedisBroker | BillingRabbitmqBroker


def make_broker(settings: Settings, *, url: str | None = None, client: Any = None) -> BillingBroker:
    """Create the broker from settings: its URL, the redelivery knobs, ``BILLING_SIGNING_KEYS``.

    The URL (``url``, else ``BILLING_BROKER_URL``, else ``BILLING_REDIS_URL``)
    chooses the broker: ``redis://``, ``rediss://`` or ``unix://`` Redis
    (:class:`BillingRedisBroker`), ``amqp://`` or ``amqps://`` RabbitMQ
    (:class:`workers.rabbitmq.BillingRabbitmqBroker`, quorum queues with
    ``BILLING_RABBITMQ_DELIVERY_LIMIT``).  Either way the process's
    encoder becomes :class:`EnvelopeCheckingEncoder` (with the Redis id
    required on Redis only) and every enqueue is signed when signing keys
    are set.

    Use :func:`workers.app.build_broker`, the composition root, rather than this.

    Parameters:
      url: Overrides the settings' broker URL.
      client: A ready ``redis.Redis`` client (tests), instead of a URL: Redis.

    Raises:
      ConfigurationError: No URL and no client, or a URL of another scheme (one line naming it).
    """
    url = url or settings.message_broker_url()
    if client is None and not url:
        raise ConfigurationError(
            f"{BROKER_URL_ENV} (or {REDIS_URL_ENV}) is not set (redis://host:port/db or"
            " amqp://user:pass@host:5672/vhost); `billing demo` starts its own Redis"
        )
    scheme = "redis" if client is not None else urlsplit(url or "").scheme
    broker: BillingBroker
    if scheme in RABBITMQ_SCHEMES:
        assert url is not None
        set_encoder(EnvelopeCheckingEncoder(require_redis_id=False))
        broker = BillingRabbitmqBroker(
            url=url,
            delivery_limit=settings.rabbitmq_delivery_limit,
            dead_message_ttl_ms=settings.dead_message_ttl_ms,
        )
    elif scheme in REDIS_SCHEMES:
        set_encoder(EnvelopeCheckingEncoder())
        broker = BillingRedisBroker(
            url=url,
            client=client,
            heartbeat_timeout=settings.heartbeat_timeout_ms,
            maintenance_chance=settings.maintenance_chance,
            maintenance_interval_ms=settings.maintenance_interval_ms,
            dead_message_ttl=settings.dead_message_ttl_ms,
        )
    else:
        raise ConfigurationError(
            f"{BROKER_URL_ENV}: unknown scheme {scheme!r}: use redis://, rediss://, unix:// (Redis)"
            " or amqp://, amqps:// (RabbitMQ)"
        )
    broker.add_middleware(AsyncIO())
    broker.add_middleware(CurrentMessage())
    keys = settings.message_signing_keys()
    if keys is not None:
        # every enqueue of this process is signed: the outbox relay, the scheduler, operator retries
        broker.add_middleware(SigningMiddleware(keys))
    return broker
