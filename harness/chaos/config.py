"""The chaos run's constants, its configuration, its fault schedule and the state it fills.

Every fault of a run comes from :func:`plan_faults` and the run's seed alone,
so ``CHAOS_SEED=... make chaos`` replays the same schedule.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
USD = 1_000_000

#: ``application_name`` of the runner's and producers' own connections, so that
#: ``pg_terminate_backend`` hits only the workers' (whose name is empty).
APP_NAME_PREFIX = "billing-chaos"
#: Substring of the poison messages' keys, and the crash point that makes them kill their worker.
POISON_MARK = "poison-"
CRASHPOINTS = f"before_commit:{POISON_MARK}"

#: Broker redelivery for chaos: a SIGKILLed worker's messages are requeued once its
#: heartbeat is 2 s old, by a maintenance pass at most 300 ms later; idle consumers
#: poll every 200 ms at most (Dramatiq's worker timeout), so they beat often.
HEARTBEAT_TIMEOUT_MS = 2_000
MAINTENANCE_INTERVAL_MS = 300
WORKER_TIMEOUT_MS = 200
#: Dramatiq restarts a consumer this long after a connection error (stock: 3 s).
CONSUMER_RESTART_DELAY_MS = 1_000
#: A poison message is refused at its 9th delivery (8 worker deaths); above
#: MAX_RETRIES + 1 (+1 for a re-run after a funds wait), so a healthy message
#: that meets bad luck is retried, not mistaken for poison.
MAX_DELIVERIES = 8
MAX_RETRIES = 5
#: Auto-top-ups per account and month (production default 1): many, so one waiting message is resumed
#: after each of several failed top-ups (a resume starts its delivery count afresh).
TOP_UPS_PER_PERIOD = 1000
#: Short backoff, so retries finish within the drain (stock: 250 ms .. 60 s).
MIN_BACKOFF_MS = 100
MAX_BACKOFF_MS = 2_000
#: Fake provider misbehaviour (per call): decline, error before charging, timeout after charging.
FAKE_DECLINE_RATE = 0.08
FAKE_ERROR_RATE = 0.05
FAKE_TIMEOUT_RATE = 0.08
FAKE_LATENCY_MS = 10

#: Cards of the auto-top-up accounts (fake provider behaviour by prefix, workers/providers/fake.py).
AUTO_CARD_WEIGHTS: list[tuple[str, int]] = [
    ("pm_card_visa", 66),
    ("pm_decline_card", 8),
    ("pm_timeout_after_charge", 10),
    ("pm_never_answers", 4),  # never answers, never charges: the reconciler finds nothing, settles failed
    ("pm_silent_charge", 4),  # charges, then never answers: the reconciler finds the charge, credits once
    ("pm_processing", 4),  # charges as processing; settles succeeded after BILLING_FAKE_PROCESSING_MS
    ("pm_processing_fail", 4),  # the same, settles failed
]
AUTO_CARDS = [c for c, _ in AUTO_CARD_WEIGHTS]
LEAN_CARD_WEIGHTS: list[tuple[str, int]] = [
    ("pm_card_visa", 40),
    ("pm_never_answers", 15),
    ("pm_silent_charge", 15),
    ("pm_processing", 15),
    ("pm_processing_fail", 15),
]
LEAN_CARDS = [c for c, _ in LEAN_CARD_WEIGHTS]
#: How long a pm_processing* charge stays processing at the fake provider (injected time).
FAKE_PROCESSING_MS = 3_600_000

PLANS: list[dict[str, Any]] = [
    {"plan_id": "basic-daily", "name": "Basic (daily)", "price_micros": 1 * USD, "interval": "day"},
    {"plan_id": "pro", "name": "Pro", "price_micros": 20 * USD, "interval": "month"},
    {"plan_id": "team", "name": "Team", "price_micros": 30 * USD, "interval": "month"},
]
#: Exponent of the Zipf-like account weights (1/rank**s).
ZIPF_S = 1.3


# ============================================================================ configuration


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


@dataclass
class ChaosConfig:
    """What a run does; every field has a ``CHAOS_*`` variable and a command-line option.

    Attributes:
      seconds: Length of the load (and of the fault schedule), in seconds.
      seed: Seed of the workload and of the fault schedule.
      messages: Messages to publish over ``seconds`` (chaos mode).
      faults: False: soak mode (no faults, paced at ``soak_load`` of the peak).
      workers: Worker slots (one Dramatiq process of ``threads`` threads each).
      producers: Producer processes.
      accounts: Accounts to create (default: a tenth of ``messages``, at least 100).
      poison: Poison messages in the load.
      drain_timeout_s: Give up waiting for the queues to drain after this long.
    """

    seconds: int = 120
    seed: int = 0
    messages: int = 20_000
    faults: bool = True
    workers: int = 3
    threads: int = 4
    producers: int = 3
    accounts: int = 0
    poison: int = 3
    drain_timeout_s: int = 180
    soak_load: float = 0.8
    write_docs: bool = False
    json_out: Path | None = None
    keep: bool = False
    docs_path: Path = ROOT / "docs" / "reliability.md"

    def __post_init__(self) -> None:
        if not self.accounts:
            self.accounts = max(100, self.messages // 10)


# ============================================================================ fault schedule


@dataclass(frozen=True)
class Fault:
    """One scheduled fault.

    Attributes:
      at_s: Seconds after the load starts.
      kind: ``kill_worker``, ``terminate_pg``, ``restart_redis``, ``clock_jump``, ``payments_outage``
        or ``resend_waiting`` (the runner re-publishes the renewals waiting for funds).
      slot: The worker slot to SIGKILL (``kill_worker``).
      outage_s: How long Redis stays down (``restart_redis``), or the
        ``billing.payments`` workers stay stopped (``payments_outage``).
      extend_s: How much longer the payments outage may last while Redis still
        holds some of the runner's re-sends of the waiting renewals.
      jump_s: How far the injected clock jumps forward (``clock_jump``), in seconds.
    """

    at_s: float
    kind: str
    slot: int = 0
    outage_s: float = 0.0
    jump_s: float = 0.0
    extend_s: float = 0.0


#: Injected-clock jumps of the load, at these fractions of the run: past the
#: key lease (15 min) and the top-up deadline (10 min); a day (every daily
#: plan due, while the payments workers are stopped); past the grace period
#: (3 days) and the fake provider's processing time.
CLOCK_JUMPS: list[tuple[float, float]] = [
    (0.20, 20 * 60.0),
    (0.72, 3 * 86_400.0 + 3_600.0),
]
#: The payments outage starts at this fraction of the run; the clock jumps a
#: day (every daily plan is due) :data:`OUTAGE_JUMP_AFTER_S` later, so the
#: renewals that need a top-up wait through the rest of the outage.
PAYMENTS_OUTAGE_AT = 0.40
OUTAGE_JUMP_AFTER_S = 1.0
OUTAGE_JUMP_S = 86_400.0 + 60.0
#: The scheduler's pass interval (real time).
SCHEDULER_INTERVAL_MS = 500
#: The scheduler re-sends a due renewal it enqueued after this long (real time plus the injected
#: clock's jumps) once the queue no longer holds it: every other pass at most.
SCHEDULER_RESEND_AFTER_MS = 1_000
#: In the payments outage the runner itself re-publishes every waiting renewal this many times,
#: this often, from a second after the day jump: more deliveries than the delivery limit allows,
#: whatever the queue's latency (the scheduler holds back what the queue still holds).
OUTAGE_RESENDS = MAX_DELIVERIES + 3
OUTAGE_RESEND_EVERY_S = 0.5


def payments_outage_s(seconds: float) -> float:
    """How long the payments workers stay stopped: 15% of the run, and at least until a second
    after the last of the runner's :data:`OUTAGE_RESENDS` re-sends of the waiting renewals."""
    return round(max(0.15 * seconds, OUTAGE_JUMP_AFTER_S + 2 + OUTAGE_RESENDS * OUTAGE_RESEND_EVERY_S), 2)


def plan_faults(seed: int, seconds: float, workers: int) -> list[Fault]:
    """The whole fault schedule of a run, from its seed alone (so a run can be replayed).

    A SIGKILL every 2 to 5 s (of any slot, the payments slot ``workers``
    included), a ``pg_terminate_backend`` pass every 4 to 9 s, one Redis
    restart between 25% and 35% or 60% and 68% of the run (away from the
    payments outage) with an outage of 0.5 to 2 s, the payments workers
    stopped from 40% for :func:`payments_outage_s` with a day's clock jump
    1 s into it and :data:`OUTAGE_RESENDS` re-sends of the waiting renewals
    after it, and the clock jumps of :data:`CLOCK_JUMPS` (each moved by
    up to 2% of the run); nothing in the last second.
    """
    rng = random.Random(f"{seed}:faults")
    faults: list[Fault] = []
    t = rng.uniform(1.5, 3.0)
    while t < seconds - 1:
        faults.append(Fault(round(t, 2), "kill_worker", slot=rng.randrange(workers + 1)))
        t += rng.uniform(2.0, 5.0)
    t = rng.uniform(2.0, 5.0)
    while t < seconds - 1:
        faults.append(Fault(round(t, 2), "terminate_pg"))
        t += rng.uniform(4.0, 9.0)
    window = rng.choice([(0.25, 0.35), (0.60, 0.68)])
    faults.append(
        Fault(
            round(rng.uniform(*window) * seconds, 2),
            "restart_redis",
            outage_s=round(rng.uniform(0.5, 2.0), 2),
        )
    )
    outage_at = round(PAYMENTS_OUTAGE_AT * seconds, 2)
    outage_s = payments_outage_s(seconds)
    # past its planned end, the outage goes on while Redis still holds some of the runner's re-sends
    # (they must be delivered while the renewals wait), but ends before the next clock jump
    extend_s = max(0.0, round((CLOCK_JUMPS[-1][0] - 0.03) * seconds - outage_at - outage_s, 2))
    faults.append(Fault(outage_at, "payments_outage", outage_s=outage_s, extend_s=extend_s))
    faults.append(Fault(round(outage_at + OUTAGE_JUMP_AFTER_S, 2), "clock_jump", jump_s=OUTAGE_JUMP_S))
    for n in range(OUTAGE_RESENDS):
        at = outage_at + OUTAGE_JUMP_AFTER_S + 1 + n * OUTAGE_RESEND_EVERY_S
        faults.append(Fault(round(at, 2), "resend_waiting"))
    for at, jump_s in CLOCK_JUMPS:
        faults.append(Fault(round((at + rng.uniform(-0.02, 0.02)) * seconds, 2), "clock_jump", jump_s=jump_s))
    return sorted(faults, key=lambda f: f.at_s)


# ============================================================================ the state of a run


@dataclass
class RunState:
    """What happened during a run (filled as it goes)."""

    run: str
    faults_injected: Counter[str] = field(default_factory=Counter)
    pg_backends_terminated: int = 0
    redis_outage_s: float = 0.0
    redis_data_kept: bool | None = None
    fault_errors: list[str] = field(default_factory=list)
    load_s: float = 0.0
    drain_s: float = 0.0
    drained: bool = False
    drain_detail: str = ""
    rss_samples: list[tuple[float, int]] = field(
        default_factory=list
    )  # (seconds since start, KiB per worker)
    backlog_samples: list[tuple[float, int]] = field(default_factory=list)
    peak_msgs_per_s: float = 0.0
    soak_rate: float = 0.0
    soak_start_ms: int = 0
    stranded: list[str] = field(default_factory=list)  # message ids (dramatiq issue #527)
    drained_after_restart: bool = False
    clock_offset_s: float = 0.0  # the injected clock's offset from the wall clock
    clock_jumps: list[float] = field(default_factory=list)  # seconds, during the load
    drive_jumps: list[float] = field(default_factory=list)  # seconds, driving the owners at the end
    drive_rounds: int = 0
    drive_s: float = 0.0
    drive_settled: bool = False
    outage: dict[str, Any] = field(default_factory=dict)  # the payments outage's figures
