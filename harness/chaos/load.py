"""The chaos run's workload: accounts, the producers' messages, and the producer processes.

Each producer process (``python -m harness.chaos produce SPEC``) draws its
messages from its own seeded stream (:class:`LoadGenerator`), publishes them
through :class:`tasks.producer.Producer`, and writes one JSON line per
publish, which the runner reads back (:func:`read_published`) for the
lost-message check.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import os
import random
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import redis

from db import money
from db.config import plain_url
from db.engine import transaction
from tasks.messages import (
    AutoTopUpMessage,
    BillingMessage,
    RecordUsageMessage,
    RenewMessage,
    RevokeKeyMessage,
    SubscribeMessage,
    renewal_key,
)
from tasks.producer import Producer

from .config import (
    APP_NAME_PREFIX,
    AUTO_CARD_WEIGHTS,
    AUTO_CARDS,
    LEAN_CARD_WEIGHTS,
    LEAN_CARDS,
    PLANS,
    POISON_MARK,
    ROOT,
    USD,
    ZIPF_S,
    ChaosConfig,
    RunState,
)
from .pool import runner_engine

# ============================================================================ workload


def make_accounts(run: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Accounts with their kind and Zipf weight (the hot ones are of every kind)."""
    rng = random.Random(f"{seed}:accounts")
    ranks = list(range(1, n + 1))
    rng.shuffle(ranks)
    out = []
    for i in range(n):
        account: dict[str, Any] = {
            "account_id": f"{run}-a{i:05d}",
            "currency": "USD",
            "weight": 1.0 / ranks[i] ** ZIPF_S,
        }
        roll = rng.random()
        if roll < 0.35:
            account.update(kind="rich", balance_micros=2_000 * USD)
        elif roll < 0.55:
            # pays for pro (20) or team (30), not both: racing subscribes charge once
            account.update(kind="racer", balance_micros=40 * USD)
        elif roll < 0.70:
            account.update(kind="poor", balance_micros=rng.choice([0, 5 * USD]))
        elif roll < 0.88:
            card = rng.choices(AUTO_CARDS, [w for _, w in AUTO_CARD_WEIGHTS])[0]
            account.update(
                kind="auto",
                balance_micros=10 * USD,
                auto_top_up_threshold_micros=30 * USD,
                auto_top_up_amount_micros=60 * USD,
                payment_method_ref=card,
            )
        else:
            # lean: just enough for one period and no threshold, so each renewal waits for a top-up
            # (through the payments outage, on the cards that never answer or stay processing)
            card = rng.choices(LEAN_CARDS, [w for _, w in LEAN_CARD_WEIGHTS])[0]
            account.update(
                kind="lean",
                balance_micros=rng.choice([1, 1, 20, 30]) * USD,
                auto_top_up_threshold_micros=0,
                auto_top_up_amount_micros=30 * USD,
                payment_method_ref=card,
            )
        out.append(account)
    return out


class _Zipf:
    def __init__(self, items: list[str], weights: list[float]) -> None:
        self.items = items
        self.cum: list[float] = []
        total = 0.0
        for w in weights:
            total += w
            self.cum.append(total)

    def pick(self, rng: random.Random) -> str:
        return self.items[min(bisect.bisect_left(self.cum, rng.random() * self.cum[-1]), len(self.items) - 1)]


class LoadGenerator:
    """The messages of one producer, drawn from its own seeded stream.

    Mix per step: 18% a message published before (same key and arguments),
    20% a subscribe, 8% a burst of one to four usage events (``record_usage``)
    on one Zipf-hot account, half the time one with auto-top-up (usage racing
    renewals on the same account, and arriving while a top-up is pending), 8%
    a racing pair (one account, two plans it can pay only one of), 26% a
    renewal of a live subscription's current period (half the time twice: the
    scheduler's key and a billing-portal key), 10% an explicit top-up, 10% a
    revocation.  Renewals and revocations need
    subscriptions: :meth:`observe` feeds a recent snapshot from PostgreSQL.
    """

    def __init__(self, run: str, index: int, seed: int, accounts: list[dict[str, Any]]) -> None:
        self.run = run
        self.index = index
        self.rng = random.Random(f"{seed}:producer:{index}")
        self.all = _Zipf([a["account_id"] for a in accounts], [a["weight"] for a in accounts])
        racers = [a for a in accounts if a["kind"] == "racer"] or accounts
        self.racers = _Zipf([a["account_id"] for a in racers], [a["weight"] for a in racers])
        auto = [a for a in accounts if a["kind"] in ("auto", "lean")] or accounts
        self.auto = _Zipf([a["account_id"] for a in auto], [a["weight"] for a in auto])
        self.weight = {a["account_id"]: float(a["weight"]) for a in accounts}
        self.subscriptions: list[tuple[str, datetime]] = []
        self.hot_subscriptions: _Zipf | None = None
        self.key_ids: list[str] = []
        self.recent: list[BillingMessage] = []
        self.seq = 0

    def observe(self, subscriptions: list[tuple[str, str, datetime]], key_ids: list[str]) -> None:
        """Take a snapshot of live subscriptions (id, account, current period end) and active managed keys.

        Renewals and revocations pick a subscription with its account's weight,
        so the hot accounts are hot for every kind of message.
        """
        self.subscriptions = [(sub_id, period_end) for sub_id, _, period_end in subscriptions]
        self.hot_subscriptions = (
            _Zipf(
                [str(i) for i in range(len(subscriptions))],
                [self.weight.get(account, 1e-6) for _, account, _ in subscriptions],
            )
            if subscriptions
            else None
        )
        self.key_ids = key_ids

    def _subscription(self) -> tuple[str, datetime]:
        assert self.hot_subscriptions is not None
        return self.subscriptions[int(self.hot_subscriptions.pick(self.rng))]

    def _key(self, kind: str) -> str:
        self.seq += 1
        return f"{self.run}:{kind}:p{self.index}:{self.seq}"

    def step(self) -> list[BillingMessage]:
        """The next message(s) to publish, back to back."""
        rng = self.rng
        roll = rng.random()
        out: list[BillingMessage]
        if roll < 0.18 and self.recent:
            out = [rng.choice(self.recent)]
        elif roll < 0.38:
            account = (self.auto if rng.random() < 0.5 else self.all).pick(rng)
            out = [
                RecordUsageMessage(
                    account_id=account,
                    amount_micros=rng.choice([100_000, 500_000, 2 * USD, 7 * USD]),
                    idempotency_key=self._key("usage"),
                    meter=rng.choice(["llm.tokens", "sms.sent"]),
                    quantity=rng.randrange(1, 5_000),
                )
                for _ in range(rng.randint(1, 4))
            ]
        elif roll < 0.46:
            out = [
                SubscribeMessage(
                    account_id=self.all.pick(rng),
                    plan_id=rng.choice(PLANS)["plan_id"],
                    idempotency_key=self._key("sub"),
                )
            ]
        elif roll < 0.54:
            account = self.racers.pick(rng)
            plans = ["pro", "team"]
            rng.shuffle(plans)
            out = [
                SubscribeMessage(account_id=account, plan_id=p, idempotency_key=self._key("race"))
                for p in plans
            ]
        elif roll < 0.80 and self.subscriptions:
            sub_id, period_start = self._subscription()
            keys = [renewal_key(sub_id, period_start)]
            if rng.random() < 0.5:
                keys.append(self._key("portal-renew"))
                rng.shuffle(keys)
            out = [
                RenewMessage(subscription_id=sub_id, period_start=period_start, idempotency_key=k)
                for k in keys
            ]
        elif roll < 0.90:
            out = [
                AutoTopUpMessage(
                    account_id=self.auto.pick(rng),
                    idempotency_key=self._key("top-up"),
                    amount_micros=rng.choice([None, 25 * USD]),
                    reason="chaos: customer asked",
                )
            ]
        elif self.subscriptions:
            if self.key_ids and rng.random() < 0.3:
                out = [
                    RevokeKeyMessage(
                        key_id=rng.choice(self.key_ids),
                        reason="chaos: key leaked",
                        idempotency_key=self._key("revoke"),
                    )
                ]
            else:
                out = [
                    RevokeKeyMessage(
                        subscription_id=self._subscription()[0],
                        reason="chaos: customer request",
                        idempotency_key=self._key("revoke"),
                    )
                ]
        else:
            out = [
                SubscribeMessage(
                    account_id=self.all.pick(rng), plan_id="basic-daily", idempotency_key=self._key("sub")
                )
            ]
        self.recent.extend(out)
        if len(self.recent) > 2_000:
            del self.recent[:500]
        return out

    def poison(self, n: int) -> BillingMessage:
        """A message that kills its worker at every delivery (``before_commit``)."""
        return SubscribeMessage(
            account_id=self.all.pick(self.rng),
            plan_id="basic-daily",
            idempotency_key=f"{POISON_MARK}{self.run}-{n}",
        )

    def doomed(self, n: int) -> BillingMessage:
        """A message that fails for good (unknown plan): recorded for operators, never applied."""
        return SubscribeMessage(
            account_id=self.all.pick(self.rng),
            plan_id="no-such-plan",
            idempotency_key=self._key(f"doomed{n}"),
        )


# ============================================================================ producer process


#: A publish that keeps failing on connection errors is abandoned after this long (Redis is gone).
PUBLISH_GIVE_UP_S = 120.0


def publish_with_retry(producer: Producer, message: BillingMessage, message_id: str) -> int:
    """Publish, retrying connection errors with the same message id and key. Returns the retries.

    A publish whose reply was lost may have been enqueued: the retry enqueues
    the same message id and idempotency key again, which the workers
    process as a duplicate.

    Raises:
      redis.ConnectionError: Still failing after :data:`PUBLISH_GIVE_UP_S`.
    """
    retries = 0
    delay = 0.05
    deadline = time.monotonic() + PUBLISH_GIVE_UP_S
    while True:
        try:
            producer.publish(message, message_id=message_id)
            return retries
        except (redis.ConnectionError, redis.TimeoutError):  # BusyLoadingError is a ConnectionError
            if time.monotonic() > deadline:
                raise
            retries += 1
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


async def _snapshot(conn: asyncpg.Connection) -> tuple[list[tuple[str, str, datetime]], list[str]]:
    subs = await conn.fetch(
        "SELECT id, account_id, current_period_end FROM subscriptions WHERE status <> 'canceled' "
        "ORDER BY updated_at DESC LIMIT 3000"
    )
    keys = await conn.fetch(
        "SELECT id FROM api_keys WHERE status = 'active' AND source = 'managed' ORDER BY created_at DESC LIMIT 100"
    )
    return [(r["id"], r["account_id"], r["current_period_end"]) for r in subs], [r["id"] for r in keys]


def produce(spec: dict[str, Any]) -> int:
    """Body of a producer process: publish ``count`` messages, paced over ``seconds`` (0: at once).

    Writes one JSON line per publish to ``spec["out"]`` (key, actor, message
    id, publish time in ms) and a summary to ``spec["out"] + ".done"``.
    """
    gen = LoadGenerator(spec["run"], spec["index"], spec["seed"], spec["accounts"])
    producer = Producer(spec["redis_url"])
    loop = asyncio.new_event_loop()
    conn: asyncpg.Connection | None = None
    count, seconds = int(spec["count"]), float(spec["seconds"])
    extras: list[tuple[float, BillingMessage]] = []
    for n in range(int(spec.get("poison", 0))):
        extras.append((gen.rng.uniform(0.05, 0.3) * seconds, gen.poison(n)))
    for n in range(int(spec.get("doomed", 0))):
        extras.append((gen.rng.uniform(0.0, 0.5) * seconds, gen.doomed(n)))
    extras.sort(key=lambda e: e[0])
    published = retries = 0
    last_snapshot = 0.0
    start = time.monotonic()
    with open(spec["out"], "w") as out:

        def send(message: BillingMessage) -> None:
            nonlocal published, retries
            message_id = str(uuid.uuid4())
            at_ms = int(time.time() * 1000)
            retries += publish_with_retry(producer, message, message_id)
            published += 1
            out.write(
                json.dumps(
                    {"k": message.idempotency_key, "a": message.actor_name, "m": message_id, "t": at_ms}
                    | (
                        {"s": message.subscription_id, "p": message.period_start.isoformat()}
                        if isinstance(message, RenewMessage)
                        else {}
                    )
                )
                + "\n"
            )

        for n, account_id in enumerate(spec.get("lean_daily", [])):
            send(
                SubscribeMessage(
                    account_id=account_id,
                    plan_id="basic-daily",
                    idempotency_key=f"{spec['run']}:lean-daily:{n}",
                )
            )
        while published < count:
            now = time.monotonic() - start
            if now - last_snapshot > 1.5:
                last_snapshot = now
                try:
                    if conn is None:
                        conn = loop.run_until_complete(
                            asyncpg.connect(
                                plain_url(spec["database_url"]),
                                server_settings={"application_name": f"{APP_NAME_PREFIX}-producer"},
                            )
                        )
                    gen.observe(*loop.run_until_complete(_snapshot(conn)))
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    conn = None  # keep the last snapshot; reconnect next time
            while extras and extras[0][0] <= now:
                send(extras.pop(0)[1])
            for message in gen.step():
                send(message)
            if seconds:
                due = start + published * seconds / count
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(min(pause, 0.5))
        for _, message in extras:
            send(message)
    if conn is not None:
        loop.run_until_complete(conn.close())
    loop.close()
    Path(spec["out"] + ".done").write_text(json.dumps({"published": published, "publish_retries": retries}))
    return 0


# ============================================================================ producers of a run


def producer_specs(
    cfg: ChaosConfig,
    state: RunState,
    database_url: str,
    redis_url: str,
    accounts: list[dict[str, Any]],
    workdir: Path,
    *,
    phase: str,
    count: int,
    seconds: float,
    poison: int,
    doomed: int,
) -> list[dict[str, Any]]:
    """The specs of the ``cfg.producers`` producer processes of one phase (``peak`` or ``load``), ``count`` shared out."""
    specs = []
    for i in range(cfg.producers):
        share = count // cfg.producers + (1 if i < count % cfg.producers else 0)
        specs.append(
            {
                "run": f"{state.run}-{phase}" if phase != "load" else state.run,
                "index": i,
                "seed": cfg.seed if phase == "load" else cfg.seed + 7919,
                "redis_url": redis_url,
                "database_url": database_url,
                "accounts": [
                    {"account_id": a["account_id"], "kind": a["kind"], "weight": a["weight"]}
                    for a in accounts
                ],
                "count": share,
                "seconds": seconds,
                "poison": poison if i == 0 else 0,
                # the lean accounts that hold one day: subscribed to the daily plan first, so the
                # day jump of the payments outage makes their renewals wait for a top-up
                "lean_daily": [
                    a["account_id"]
                    for a in accounts
                    if a["kind"] == "lean" and a.get("balance_micros") == USD
                ]
                if i == 0 and phase == "load"
                else [],
                "doomed": doomed if i == min(1, cfg.producers - 1) else 0,
                "out": str(workdir / f"published-{phase}-{i}.jsonl"),
            }
        )
    return specs


def start_producers(specs: list[dict[str, Any]], signing_keys: str) -> list[subprocess.Popen[bytes]]:
    """Start one ``python -m harness.chaos produce SPEC`` process per spec (its own process group), signing with ``signing_keys``."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BILLING_")},
        "BILLING_SIGNING_KEYS": signing_keys,
    }
    procs = []
    for spec in specs:
        path = Path(spec["out"] + ".spec.json")
        path.write_text(json.dumps(spec))
        log = open(spec["out"] + ".log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "harness.chaos", "produce", str(path)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()
    return procs


def read_published(specs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The producers' publish records (one dict per publish) and their publish retries in all."""
    records: list[dict[str, Any]] = []
    retries = 0
    for spec in specs:
        with open(spec["out"]) as f:
            records.extend(json.loads(line) for line in f if line.strip())
        done = Path(spec["out"] + ".done")
        if done.exists():
            retries += int(json.loads(done.read_text())["publish_retries"])
    return records, retries


async def create_accounts(url: str, accounts: list[dict[str, Any]]) -> None:
    """Create the run's plans and accounts (:func:`make_accounts`) through ``db.money``."""
    engine = runner_engine(url)
    now = datetime.now(UTC)
    try:
        async with transaction(engine) as conn:
            for p in PLANS:
                await money.create_plan(conn, currency="USD", **p)
            for a in accounts:
                await money.create_account(
                    conn, now=now, **{k: v for k, v in a.items() if k not in ("kind", "weight")}
                )
    finally:
        await engine.dispose()
