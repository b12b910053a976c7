"""BatchProcessing: the messages of high-volume queues go to the event loop in batches, not a thread each.

Stock Dramatiq runs every message on a worker thread of its own: the thread
takes it off the work queue, runs the middleware, hands the actor's
coroutine to the AsyncIO event loop and waits, then acks it in its own
round trip to Redis.  For kinds whose messages arrive by the thousand (a
usage event is a few microseconds of PostgreSQL once grouped) that
hand-off and that ack cost more than the work.  This middleware gives the
queues it is told about (``BILLING_BATCH_QUEUES``) their own work queue,
read by a few batch threads (``BILLING_BATCH_THREADS``) instead of the
worker's threads.  A batch thread takes what is waiting, up to
``batch_size`` messages, and for them:

1. runs ``before_process_message`` of every middleware, message by message,
   as Dramatiq's worker thread does;
2. hands all of them to the event loop at once (one hand-off), where each
   runs the actor's body concurrently; the kinds with a group commit
   (:mod:`workers.group_commit`) then claim and apply the whole batch in a
   fixed number of statements;
3. runs ``after_process_message`` message by message, with each message's
   own result or exception: Dramatiq's Retries middleware retries or
   dead-letters each one as it would on a worker thread;
4. acknowledges the ones that succeeded in one round trip to Redis
   (:meth:`workers.broker._BillingConsumer.ack_many`), and rejects the failed
   ones one by one, as Dramatiq does.

Nothing changes for a message's guarantees: it is acked only after its
outcome committed (or its failure was recorded), each message keeps its
own outcome, failure record and retries, and a process killed in the
middle of a batch leaves every unacked message of it for redelivery.
While several batch threads run, one batch can be at PostgreSQL while the
next gathers.  On shutdown, messages fetched but not started are requeued
(as Dramatiq requeues its own work queue's).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from queue import Empty, PriorityQueue
from typing import Any

import dramatiq
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.common import q_name
from dramatiq.errors import BrokerConnectionError
from dramatiq.logging import get_logger
from dramatiq.middleware import Middleware, SkipMessage
from dramatiq.worker import ConsumerThread, Worker, WorkerThread

__all__ = ["BatchProcessing", "BatchWorkerThread"]

#: ``deliver(message)``: runs one message's actor body on the event loop (raises what the actor raises).
Deliver = Callable[[dramatiq.Message[Any]], Awaitable[Any]]
#: ``unfinished(messages)``: the ids of those an earlier delivery started and did not finish.
Unfinished = Callable[[list[dramatiq.Message[Any]]], Awaitable[set[str]]]

_log = get_logger(__name__, "BatchProcessing")

#: Pause before an ack is tried again while Redis is unreachable, in seconds (as Dramatiq's).
ACK_RETRY_DELAY_S = 5.0


class BatchProcessing(Middleware):  # type: ignore[misc]
    """Dramatiq middleware: the messages of ``queues`` are processed by batch threads (see the module).

    Parameters:
      deliver: Runs one message's actor body as a coroutine (the worker
        runtime's; it takes the message itself, not Dramatiq's current message).
      queues: Canonical queue names (``billing.usage``) whose messages go in batches.
      threads: Batch threads per worker process.
      batch_size: Most messages a batch thread takes at once.
      unfinished: Tells which messages of a batch an earlier delivery started
        and did not finish; those run one at a time (see :class:`BatchWorkerThread`).
    """

    def __init__(
        self,
        deliver: Deliver,
        queues: Iterable[str],
        *,
        threads: int = 2,
        batch_size: int = 64,
        unfinished: Unfinished | None = None,
    ) -> None:
        self.deliver = deliver
        self.unfinished = unfinished
        self.queues = frozenset(queues)
        self.threads = max(1, threads)
        self.batch_size = max(1, batch_size)
        #: The batch queues' work queue (Dramatiq's item type: priority, message).
        self.work_queue: PriorityQueue[Any] = PriorityQueue()
        self.batch_threads: list[BatchWorkerThread] = []

    @property
    def prefetch(self) -> int:
        """Messages a batch queue's consumer holds unacked at most: two batches per thread."""
        return self.threads * self.batch_size * 2

    def after_consumer_thread_boot(self, broker: dramatiq.Broker, thread: ConsumerThread) -> None:
        # runs in the consumer thread before its first fetch: from then on its
        # messages go to the batch threads (a delay queue's consumer only moves
        # due messages back to their queue, so it keeps its own)
        if thread.queue_name in self.queues:
            thread.work_queue = self.work_queue
            thread.prefetch = max(thread.prefetch, self.prefetch)

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Worker) -> None:
        if not any(q_name(name) in self.queues for name in worker.consumers):
            return  # this worker consumes none of them (``--queues``)
        for _ in range(self.threads):
            thread = BatchWorkerThread(
                broker=broker,
                consumers=worker.consumers,
                work_queue=self.work_queue,
                worker_timeout=worker.worker_timeout,
                deliver=self.deliver,
                batch_size=self.batch_size,
                unfinished=self.unfinished,
            )
            thread.start()
            # Worker.pause/stop/join treat them like its own threads
            worker.workers.append(thread)
            self.batch_threads.append(thread)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Worker) -> None:
        # the batch threads have stopped; what the consumers fetched since goes back to Redis
        by_queue: dict[str, list[Any]] = defaultdict(list)
        while True:
            try:
                item = self.work_queue.get_nowait()
            except Empty:
                break
            by_queue[item.message.queue_name].append(item.message)
            self.work_queue.task_done()
        for queue_name, messages in by_queue.items():
            try:
                worker.consumers[queue_name].requeue_messages(messages)
            except BrokerConnectionError:
                _log.warning("Failed to requeue %d messages on %r.", len(messages), queue_name)


class BatchWorkerThread(WorkerThread):  # type: ignore[misc]
    """A Dramatiq worker thread that processes up to ``batch_size`` messages at a time on the event loop.

    A message that kills its worker (a poison message) takes its whole batch
    down with it, and Dramatiq gives the batch back together.  The delivery
    count that bounds poison messages would then climb for every message of
    the batch, and the innocent ones would be dead-lettered with it.  So the
    messages that an earlier delivery started and did not finish (``unfinished``)
    run one at a time, after the others of their batch are acked: a poison
    message dies alone, and a message that died beside one before is counted
    only once more.

    Parameters:
      deliver, unfinished: See :class:`BatchProcessing`.
      batch_size: Most messages per batch.
      **kwargs: Dramatiq's :class:`~dramatiq.worker.WorkerThread` arguments.
    """

    def __init__(
        self, *, deliver: Deliver, batch_size: int, unfinished: Unfinished | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.deliver = deliver
        self.unfinished = unfinished
        self.batch_size = batch_size
        #: Batches processed, messages in them, and messages run alone as unfinished (for tests and profiles).
        self.batches = 0
        self.messages = 0
        self.alone = 0

    def run(self) -> None:
        self.running = True
        self.broker.emit_after("worker_thread_boot", self)
        while self.running:
            if self.paused:
                self.paused_event.set()
                time.sleep(self.timeout)
                continue
            try:
                batch = [self.work_queue.get(timeout=self.timeout).message]
            except Empty:
                continue
            while len(batch) < self.batch_size:
                try:
                    batch.append(self.work_queue.get_nowait().message)
                except Empty:
                    break
            try:
                self.process_batch(batch)
            finally:
                for _ in batch:
                    self.work_queue.task_done()
        self.broker.emit_before("worker_thread_shutdown", self)

    def process_batch(self, messages: list[Any]) -> None:
        """Run ``messages`` (Dramatiq message proxies) through the middleware and their actors, then ack or reject each.

        The steps of :meth:`dramatiq.worker.WorkerThread.process_message`,
        each for the whole batch: the actors' bodies run concurrently on the
        event loop, in one hand-off; then the unfinished ones, one at a time.
        """
        self.batches += 1
        self.messages += len(messages)
        broker = self.broker
        started: list[tuple[Any, dramatiq.Actor[Any, Any]]] = []
        done: list[Any] = []
        for message in messages:
            try:
                broker.emit_before("process_message", message)
                if message.failed:  # a middleware failed it (e.g. AgeLimit)
                    broker.emit_after("process_message", message, result=None)
                    done.append(message)
                else:
                    started.append((message, broker.get_actor(message.actor_name)))
            except BaseException as exc:  # noqa: BLE001 - as Dramatiq's worker thread: the message's outcome
                self._failed(message, None, exc)
                done.append(message)
        unfinished = self._unfinished([message for message, _ in started])
        alone = [item for item in started if item[0].message_id in unfinished]
        together = [item for item in started if item[0].message_id not in unfinished]
        self.alone += len(alone)
        try:
            self._post_process(done + self._process(together))
            for item in alone:
                self._post_process(self._process([item]))
        finally:
            for message in messages:
                message.clear_exception()

    def _unfinished(self, messages: list[Any]) -> set[str]:
        if self.unfinished is None or not messages:
            return set()
        loop = get_event_loop_thread()
        if loop is None:
            return set()
        try:
            found: set[str] = loop.run_coroutine(self.unfinished(messages))
        except Exception:  # noqa: BLE001 - PostgreSQL unreachable: the batch's own statements fail and retry
            return set()
        return found

    def _process(self, started: list[tuple[Any, dramatiq.Actor[Any, Any]]]) -> list[Any]:
        """Run the actors of ``started`` together and their after-process middleware; returns the messages."""
        if not started:
            return []
        broker = self.broker
        try:
            outcomes = self._run([message for message, _ in started])
        except BaseException as exc:  # noqa: BLE001 - the hand-off itself failed: every message fails with it
            outcomes = [exc] * len(started)
        for (message, actor), outcome in zip(started, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self._failed(message, actor, outcome)
            else:
                try:
                    broker.emit_after("process_message", message, result=None)
                except BaseException as exc:  # noqa: BLE001
                    self._failed(message, actor, exc)
        return [message for message, _ in started]

    def _run(self, messages: list[Any]) -> list[Any]:
        loop = get_event_loop_thread()
        if loop is None:
            raise RuntimeError("the AsyncIO middleware's event loop is not running")

        async def deliver_all() -> list[Any]:
            return await asyncio.gather(*(self.deliver(m) for m in messages), return_exceptions=True)

        outcomes: list[Any] = loop.run_coroutine(deliver_all())
        return outcomes

    def _failed(self, message: Any, actor: dramatiq.Actor[Any, Any] | None, exc: BaseException) -> None:
        """What Dramatiq's worker thread does with a message whose processing raised ``exc``."""
        message.stuff_exception(exc)
        if isinstance(exc, SkipMessage):
            self.logger.warning("Message %s was skipped.", message)
            self.broker.emit_after("skip_message", message)
            return
        throws = message.options.get("throws") or (actor and actor.options.get("throws"))
        if throws and isinstance(exc, throws):
            self.logger.info(
                "Failed to process message %s with expected exception %s.", message, type(exc).__name__
            )
        elif not isinstance(exc, dramatiq.Retry):
            self.logger.error("Failed to process message %s with unhandled exception.", message, exc_info=exc)
        try:
            # raised again so the Retries middleware stores the message's own traceback
            raise exc
        except BaseException:  # noqa: BLE001
            self.broker.emit_after("process_message", message, exception=exc)

    def _post_process(self, messages: list[Any]) -> None:
        """Ack the messages that succeeded, per queue in one round trip each; reject the failed ones."""
        to_ack: dict[str, list[Any]] = defaultdict(list)
        for message in messages:
            if message.failed:
                self.consumers[message.queue_name].post_process_message(message)
            else:
                to_ack[message.queue_name].append(message)
        for queue_name, batch in to_ack.items():
            consumer: Any = self.consumers[queue_name].consumer
            if not hasattr(consumer, "ack_many"):  # another broker's consumer: one ack each
                for message in batch:
                    self.consumers[queue_name].post_process_message(message)
                continue
            for message in batch:
                self.broker.emit_before("ack", message)
            while True:
                try:
                    consumer.ack_many(batch)
                    break
                except BrokerConnectionError as exc:
                    # as Dramatiq's post_process_message: wait for Redis rather
                    # than have the batch processed again after a restart
                    self.logger.warning(
                        "Failed to ack %d messages (%s); retrying in %s s.",
                        len(batch),
                        exc,
                        ACK_RETRY_DELAY_S,
                    )
                    time.sleep(ACK_RETRY_DELAY_S)
            for message in batch:
                self.broker.emit_after("ack", message)
