"""Redelivery of a dead worker's messages: maintenance runs per queue on a timer."""

from __future__ import annotations

import time

import dramatiq

from workers.broker import make_broker
from workers.settings import Settings


def test_a_dead_workers_message_is_requeued_by_the_next_command_on_its_queue(services):
    settings = Settings(
        redis_url=services.redis_db(2),
        heartbeat_timeout_ms=1000,
        maintenance_interval_ms=100,
        maintenance_chance=0,  # no random passes: only the timer
    )
    dying = make_broker(settings)
    dying.declare_queue("billing.payments")
    msg = dying.enqueue(dramatiq.Message("billing.payments", "auto_top_up", (), {"k": 1}, {}))
    consumer = dying.consume("billing.payments", prefetch=1, timeout=100)
    held = next(consumer)
    assert held is not None and held.message_id == msg.message_id  # in the dying worker's acks now
    time.sleep(1.2)  # its heartbeat is now older than the timeout

    survivor = make_broker(settings)
    # a command on another queue takes that queue's maintenance pass ...
    survivor.do_qsize("billing")
    # ... and does not use up the payments queue's: its next command requeues the message
    fetched = survivor.do_fetch("billing.payments", 1)
    assert len(fetched) == 1 and msg.message_id in fetched[0].decode()
    for b in (dying, survivor):
        b.client.close()
