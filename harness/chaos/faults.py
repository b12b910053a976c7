"""The chaos run's faults, injected on schedule while the producers publish.

SIGKILL of a worker slot, ``pg_terminate_backend`` of the workers'
connections, a Redis restart (``SHUTDOWN``, an outage, then the same port and
directory), a payments outage (the ``billing.payments`` slot stopped) and
jumps of the injected clock.  A fault that cannot be injected is recorded in
the run's state, not fatal.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta

from rich.console import Console

from tasks.messages import RenewMessage
from tasks.producer import Producer, to_dramatiq_message
from tasks.signing import signing_keys_from_env
from workers.broker import BillingRedisBroker
from workers.clock import write_clock_offset

from .config import APP_NAME_PREFIX, ChaosConfig, Fault, RunState
from .load import PUBLISH_GIVE_UP_S
from .pool import Database, RedisInfo, WorkerPool, pg_connect


async def _terminate_workers_connections(url: str) -> int:
    """``pg_terminate_backend`` every client connection to the database except ours (the workers')."""
    conn = await pg_connect(url)
    try:
        return int(
            await conn.fetchval(
                """
                SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()
                  AND backend_type = 'client backend' AND application_name NOT LIKE $1
                """,
                f"{APP_NAME_PREFIX}%",
            )
        )
    finally:
        await conn.close()


def jump_clock(pool: WorkerPool, state: RunState, seconds: float) -> None:
    """Move the injected clock of every worker and of the scheduler ``seconds`` forward."""
    state.clock_offset_s += seconds
    write_clock_offset(pool.clock_file, timedelta(seconds=state.clock_offset_s))


def _waiting_renewals(url: str) -> dict[str, RenewMessage | None]:
    """Every renewal key waiting for funds -> its message, from its ``funds_waits`` row (None without one)."""

    async def go() -> dict[str, RenewMessage | None]:
        conn = await pg_connect(url)
        try:
            rows = await conn.fetch(
                "SELECT k.key, w.kwargs FROM idempotency_keys k"
                " LEFT JOIN funds_waits w ON w.idempotency_key = k.key"
                " WHERE k.kind = 'renew' AND k.status = 'waiting_for_funds'"
            )
            return {
                r["key"]: None
                if r["kwargs"] is None
                else RenewMessage.model_validate(json.loads(r["kwargs"]))
                for r in rows
            }
        finally:
            await conn.close()

    return asyncio.run(go())


def resend_waiting(pool: WorkerPool, rds: RedisInfo, db: Database, state: RunState) -> int:
    """Publish every renewal waiting for funds once more, signed, as a re-sending producer would.

    The scheduler holds back a renewal the queue still holds, so under load it
    re-sends a waiting one only a few times in an outage; these re-sends, from
    outside, take each waiting renewal past the delivery limit.  Counted per
    key in ``state.outage["resent"]``; their Redis ids go to
    ``state.outage["resent_ids"]``, so the outage lasts until the workers
    have taken them (:func:`_resends_queued`).  Returns how many were published.
    """
    messages = [m for m in _waiting_renewals(db.url).values() if m is not None]
    producer = Producer(rds.url, signing_keys=signing_keys_from_env(pool.env))
    try:
        resent = state.outage.setdefault("resent", {})
        ids = state.outage.setdefault("resent_ids", [])
        for message in messages:
            enqueued = producer.broker.enqueue(to_dramatiq_message(message))
            ids.append(enqueued.options["redis_message_id"])
            resent[message.idempotency_key] = resent.get(message.idempotency_key, 0) + 1
    finally:
        producer.broker.close()
    return len(messages)


def _resends_queued(rds: RedisInfo, state: RunState) -> int:
    """How many of the runner's re-sends Redis still holds (not yet taken by a worker)."""
    ids = state.outage.get("resent_ids", [])
    if not ids:
        return 0
    broker = BillingRedisBroker(url=rds.url)
    try:
        return len(broker.held(RenewMessage.queue_name, ids))
    finally:
        broker.close()


def _inject(
    fault: Fault, pool: WorkerPool, rds: RedisInfo, db: Database, state: RunState, console: Console
) -> Fault | None:
    """Inject one fault; returns a follow-up to schedule (the end of a payments outage), if any."""
    try:
        if fault.kind == "clock_jump":
            jump_clock(pool, state, fault.jump_s)
            state.clock_jumps.append(fault.jump_s)
            if state.outage and "ended_ms" not in state.outage and "jump_ms" not in state.outage:
                state.outage["jump_ms"] = int(time.time() * 1000)  # the day jump that makes renewals due
            state.faults_injected["clock jump"] += 1
            console.print(
                f"{fault.at_s:6.1f}s clock jumps {timedelta(seconds=fault.jump_s)} "
                f"(injected clock now wall + {timedelta(seconds=round(state.clock_offset_s))})"
            )
        elif fault.kind == "payments_outage":
            state.outage = {
                "started_ms": int(time.time() * 1000),
                "planned_s": fault.outage_s,
                "extend_s": fault.extend_s,
            }
            pool.pause(pool.payments_slot)
            state.faults_injected["payments workers stopped"] += 1
            console.print(f"{fault.at_s:6.1f}s billing.payments workers stopped for {fault.outage_s:.1f} s")
            return Fault(round(fault.at_s + fault.outage_s, 2), "payments_resume")
        elif fault.kind == "payments_resume":
            # not before the workers have taken the re-sends (a queue behind a backlog delivers them
            # late, after the waits resumed, and then they test nothing), for up to the outage's extend_s
            late_s = time.time() - state.outage["started_ms"] / 1000 - state.outage["planned_s"]
            if late_s < state.outage["extend_s"] and _resends_queued(rds, state):
                return Fault(round(fault.at_s + 0.5, 2), "payments_resume")
            state.outage["extended_s"] = round(max(0.0, late_s), 1)
            # the renewals waiting for a top-up now, and the scheduler passes since the jump that made them due
            waiting = _waiting_renewals(db.url)
            state.outage["waiting_renewals"] = len(waiting)
            state.outage["waiting_keys"] = sorted(waiting)[:1000]
            state.outage["ended_ms"] = int(time.time() * 1000)
            pool.resume(pool.payments_slot)
            console.print(
                f"{fault.at_s:6.1f}s billing.payments workers back; {len(waiting)} renewal(s) waiting for a top-up"
            )
        elif fault.kind == "resend_waiting":
            if state.outage and "ended_ms" not in state.outage:
                resend_waiting(pool, rds, db, state)
        elif fault.kind == "kill_worker":
            pool.kill(fault.slot)
            state.faults_injected["worker SIGKILL"] += 1
        elif fault.kind == "terminate_pg":
            n = asyncio.run(_terminate_workers_connections(db.url))
            state.faults_injected["pg_terminate_backend passes"] += 1
            state.pg_backends_terminated += n
        elif fault.kind == "restart_redis":
            if rds.server is None:
                console.print(f"[yellow]{fault.at_s:6.1f}s Redis restart skipped (fakeredis)[/yellow]")
                return None
            console.print(f"{fault.at_s:6.1f}s restarting Redis (SHUTDOWN, {fault.outage_s:.1f} s outage)")
            kept = rds.server.restart(fault.outage_s)
            state.faults_injected["Redis restart"] += 1
            state.redis_outage_s = fault.outage_s
            state.redis_data_kept = kept
            console.print(
                f"{fault.at_s:6.1f}s Redis back, append-only data {'kept' if kept else '[red]LOST[/red]'}"
            )
    except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported, not fatal
        state.fault_errors.append(f"{fault.kind} at {fault.at_s}s: {type(exc).__name__}: {exc}")
        if fault.kind == "payments_outage":
            return Fault(round(fault.at_s + fault.outage_s, 2), "payments_resume")
    return None


def drive_load(
    cfg: ChaosConfig,
    pool: WorkerPool,
    producers: list[subprocess.Popen[bytes]],
    faults: list[Fault],
    rds: RedisInfo,
    db: Database,
    state: RunState,
    console: Console,
    *,
    seconds: float,
    sample: Callable[[float], None] | None = None,
) -> float:
    """Run the fault schedule while the producers publish; returns the load's length in seconds."""
    pending = list(faults)
    start = time.monotonic()
    next_progress = 10.0
    while True:
        now = time.monotonic() - start
        pool.supervise()
        while pending and pending[0].at_s <= now:
            follow_up = _inject(pending.pop(0), pool, rds, db, state, console)
            if follow_up is not None:
                bisect.insort(pending, follow_up, key=lambda f: f.at_s)
        if sample is not None:
            sample(now)
        if now >= next_progress:
            next_progress += 10
            console.print(
                f"{now:6.1f}s load flowing; faults so far: "
                + (", ".join(f"{k} {v}" for k, v in sorted(state.faults_injected.items())) or "none")
                + (f"; worker exits: {dict(pool.exits)}" if pool.exits else "")
            )
        done = all(p.poll() is not None for p in producers)
        if done and now >= seconds:
            break
        if done and not pending:
            break
        if now > seconds + PUBLISH_GIVE_UP_S + 60:
            raise RuntimeError("producers did not finish publishing")
        time.sleep(0.05)
    return time.monotonic() - start
