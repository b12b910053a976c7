"""The queue counts operators see on RabbitMQ (``billing ops queues``, the dashboard's queue page).

What :mod:`workers.operators.redis_layout` reads from Redis keys, read here
with AMQP passive declares (:meth:`workers.rabbitmq.BillingRabbitmqBroker.queue_counts`):
ready messages of each queue, of its delay queue and of its dead-letter
queue.  AMQP does not say how many messages consumers hold unacknowledged,
how old the oldest ready one is, or which workers are alive (RabbitMQ's
management API or ``rabbitmqctl list_queues messages_unacknowledged
consumers`` do), so those are None and the workers list is empty.
"""

from __future__ import annotations

from typing import Any

from .redis_layout import QUEUES, QueueStats, WorkerSeen

__all__ = ["queue_overview"]


def queue_overview(broker: Any) -> tuple[list[QueueStats], list[WorkerSeen]]:
    """Per-queue counts of the contract's queues on a RabbitMQ broker, and no workers (blocks).

    Parameters:
      broker: A :class:`workers.rabbitmq.BillingRabbitmqBroker`.

    Raises:
      dramatiq.errors.ConnectionClosed: RabbitMQ could not be reached.
    """
    stats = []
    for queue in QUEUES:
        ready, delayed, dead = broker.queue_counts(queue)
        stats.append(
            QueueStats(
                queue=queue, ready=ready, delayed=delayed, in_flight=None, dead=dead, oldest_ready_age_s=None
            )
        )
    return stats, []
