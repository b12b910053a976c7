"""Draining the chaos run's queues, and driving every waiting state past its owner's deadline.

Once the load is published, the queues must drain (:func:`drain_run`), and
then the injected clock is moved forward in steps (:func:`drive_owners`) so
that every key lease, top-up deadline, processing charge and grace period
has expired and been dealt with by its owner (the scheduler's completer and
reconciler) before the audit looks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import redis
from rich.console import Console

from harness.services import DrainState, drain
from workers.clock import OffsetClock

from .config import HEARTBEAT_TIMEOUT_MS, RunState
from .faults import jump_clock
from .pool import Database, RedisInfo, WorkerPool, pg_connect, read_passes

#: A delayed message still held this long after its eta by a live worker is stranded (backoff is 2 s at most).
STRANDED_AFTER_MS = 10_000


def stranded_delayed(client: Any, *, older_than_ms: int = STRANDED_AFTER_MS) -> list[str]:
    """Message ids of delayed messages (retries) held by a live worker long after their eta.

    Dramatiq's consumer of a delay queue (``billing.DQ``) fetches a retry
    early and keeps it in memory until its eta; on a Redis connection error
    it drops that memory (``delay_queue = PriorityQueue()``) but the id stays
    in the worker's acknowledgement set, so nobody delivers it again until
    that worker process exits and its heartbeat expires (upstream:
    Bogdanp/dramatiq issue #527).
    """
    now_ms = time.time() * 1000
    live = {
        (w.decode() if isinstance(w, bytes) else w)
        for w, score in client.zrange("dramatiq:__heartbeats__", 0, -1, withscores=True)
        if now_ms - score < HEARTBEAT_TIMEOUT_MS
    }
    found = []
    for worker_id in live:
        for queue in ("billing", "billing.payments"):
            for redis_id in client.smembers(f"dramatiq:__acks__.{worker_id}.{queue}.DQ"):
                raw = client.hget(f"dramatiq:{queue}.DQ.msgs", redis_id)
                if raw is None:
                    continue
                message = json.loads(raw)
                if now_ms - float(message.get("options", {}).get("eta", now_ms)) > older_than_ms:
                    found.append(str(message["message_id"]))
    return found


def drain_run(
    pool: WorkerPool,
    rds: RedisInfo,
    db: Database,
    state: RunState,
    timeout_s: float,
    sample: Callable[[float], None] | None = None,
    t0: float = 0.0,
    *,
    detect_stranded: bool = True,
    quiet_needed: int = 3,
    poll_s: float = 0.5,
) -> bool:
    """:func:`harness.services.drain` of the run: every queue and the outbox empty, ``quiet_needed`` looks in a row.

    Each look also refills the worker slots and takes a sample (soak mode).
    Redis and PostgreSQL errors count as busy looks (Redis may be restarting).
    Returns False on timeout, and as soon as everything left is delayed
    messages stranded in a live worker (:func:`stranded_delayed`, listed in
    ``state.stranded``): waiting would not help.
    """
    client = redis.Redis.from_url(rds.url, socket_timeout=5)
    start = time.monotonic()

    def check(look: DrainState) -> bool:
        pool.supervise()
        if sample is not None:
            sample(t0 + time.monotonic() - start)
        state.drain_detail = look.detail()
        if (
            detect_stranded
            and not look.drained
            and look.outbox == 0
            and all(q.ready == 0 and q.delayed == 0 for q in look.queues)
        ):
            try:
                stranded = stranded_delayed(client)
            except redis.RedisError:
                stranded = []
            if stranded and len(stranded) == sum(q.in_flight for q in look.queues):
                state.stranded += [m for m in stranded if m not in state.stranded]
                state.drain_detail += f"; {len(stranded)} delayed message(s) stranded in a live worker"
                return False
        return True

    try:
        look = drain(
            client, db.url, timeout_s=timeout_s, quiet_needed=quiet_needed, poll_s=poll_s,
            retry_errors=True, check=check,
        )  # fmt: skip
        return look.drained
    except TimeoutError:
        state.drain_detail = f"not drained after {timeout_s:.0f} s: {state.drain_detail}"
        return False
    finally:
        state.drain_s = time.monotonic() - start
        client.close()


#: Clock steps that take every owner past its deadline once the load has drained: past the key
#: lease and the top-up deadline, past the fake provider's processing time and the reconciler's
#: processing poll, past the end of grace of a subscription that went past_due at the last jump;
#: then past the lease and top-up deadline again for what that step started.
DRIVE_STEPS_S: list[float] = [20 * 60.0, 2 * 3_600.0, 3 * 86_400.0 + 3_600.0, 20 * 60.0, 20 * 60.0]
#: Further 20-minute steps while something still waits (top-up pending, key unfinished, wait, outbox).
DRIVE_EXTRA_STEPS = 6

_UNSETTLED = """
    SELECT (SELECT count(*) FROM idempotency_keys WHERE status IN ('processing', 'waiting_for_funds'))
         + (SELECT count(*) FROM top_up_attempts
            WHERE status = 'pending' AND provider_status IS DISTINCT FROM 'processing')
         + (SELECT count(*) FROM funds_waits) + (SELECT count(*) FROM outbox)
         + (SELECT count(*) FROM subscriptions WHERE status = 'active' AND current_period_end <= $1)
         + (SELECT count(*) FROM subscriptions WHERE status = 'past_due' AND grace_ends_at <= $1)
"""


def _unsettled(url: str, now: datetime) -> int:
    async def go() -> int:
        conn = await pg_connect(url)
        try:
            return int(await conn.fetchval(_UNSETTLED, now))
        finally:
            await conn.close()

    return asyncio.run(go())


def _wait_for_pass(pool: WorkerPool, after_ms: int, timeout_s: float = 60) -> dict[str, Any] | None:
    """The first scheduler pass that started after ``after_ms`` (wall ms) and finished without error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pool.supervise()
        for p in read_passes(pool.passes_path):
            if p["t0"] > after_ms and "error" not in p:
                return p
        time.sleep(0.1)
    return None


def _pass_work(p: dict[str, Any]) -> int:
    return int(
        p.get("renewals", 0) + p.get("retries", 0) + p.get("redriven", 0) + p.get("ended", 0)
        + p.get("released", 0) + sum(p.get("settled", {}).values())
    )  # fmt: skip


def drive_owners(
    pool: WorkerPool, rds: RedisInfo, db: Database, state: RunState, console: Console, *, timeout_s: float
) -> bool:
    """Take every waiting state past its owner's deadline, so the quiescent audit can pass honestly.

    For each step of :data:`DRIVE_STEPS_S` (then up to :data:`DRIVE_EXTRA_STEPS`
    more of 20 minutes while something still waits): jump the injected
    clock, then, up to 4 rounds, wait for a scheduler pass that started
    after the jump (due scan, completer, reconciler) and for the queues to
    drain; the step is done when a pass started after the drain finds
    nothing to do.  Returns whether the end state is settled: nothing
    processing, waiting, pending, in the outbox, or entitled past its deadline.
    """
    started = time.monotonic()
    load_drain_s = state.drain_s  # the drive's own drains must not overwrite the load's figure
    clock = OffsetClock(pool.clock_file)
    steps = list(DRIVE_STEPS_S)
    extra = 0
    while steps:
        step = steps.pop(0)
        jump_clock(pool, state, step)
        state.drive_jumps.append(step)
        mark = int(time.time() * 1000)
        for _ in range(4):
            state.drive_rounds += 1
            p = _wait_for_pass(pool, mark)
            if p is None:
                console.print("[red]no scheduler pass within 60 s[/red]")
                break
            drained = drain_run(
                pool, rds, db, state, timeout_s, detect_stranded=False, quiet_needed=2, poll_s=0.25
            )
            mark = int(time.time() * 1000)
            if not drained:
                break
            if _pass_work(p) == 0:
                break
        if time.monotonic() - started > timeout_s:
            break
        if not steps and extra < DRIVE_EXTRA_STEPS and _unsettled(db.url, clock.now()):
            extra += 1
            steps.append(20 * 60.0)
    # one more pass after the last drain, and the queues still empty after it
    _wait_for_pass(pool, int(time.time() * 1000))
    drain_run(pool, rds, db, state, timeout_s, detect_stranded=False, quiet_needed=2, poll_s=0.25)
    state.drive_s = time.monotonic() - started
    state.drain_s = load_drain_s
    state.drive_settled = _unsettled(db.url, clock.now()) == 0
    console.print(
        f"owners driven past their deadlines: {len(state.drive_jumps)} clock steps "
        f"({', '.join(str(timedelta(seconds=j)) for j in state.drive_jumps)}), {state.drive_rounds} rounds, "
        f"{state.drive_s:.1f} s; {'settled' if state.drive_settled else '[red]NOT settled[/red]'}"
    )
    return state.drive_settled
