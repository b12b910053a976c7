"""Prometheus metrics: Dramatiq's own and the billing counters, on one endpoint.

``billing worker`` runs Dramatiq's worker processes, each with its own
counters.  prometheus_client's multiprocess mode adds them up: every
process writes its values to files in one directory
(``PROMETHEUS_MULTIPROC_DIR``, Dramatiq's ``dramatiq_prom_db``), and the
exposition server that Dramatiq's :class:`~dramatiq.middleware.prometheus.Prometheus`
middleware forks from the master process reads them all and serves
``/metrics`` (``BILLING_METRICS_HOST``:``BILLING_METRICS_PORT``).

prometheus_client chooses multiprocess mode when it is first imported, from
the environment; so this module imports it only when a metric is first
created: in a worker process that is after Dramatiq's process boot (which
sets the directory), in any other process (an in-process
``dramatiq.Worker`` in tests or ``billing demo --months``) the metrics are
plain in-memory ones, readable from :attr:`BillingMetrics.registry`.

The billing calls (:func:`effect_committed`, :func:`duplicate_suppressed`,
:func:`idempotency_conflict`, :func:`failure_recorded`) never raise: a
metric that cannot be written is logged and the message goes on.

Counts are per committed transaction: a worker that dies between a commit
and the next line loses that one increment (the redelivery is a suppressed
duplicate), never counts it twice.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec

import dramatiq
import structlog
from dramatiq.middleware import CurrentMessage, Middleware

from tasks.errors import BillingError
from tasks.messages import MESSAGE_MODELS, AutoTopUpMessage

if TYPE_CHECKING:
    from dramatiq.broker import MessageProxy
    from dramatiq.middleware.prometheus import Prometheus
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from db.money import Effect

    from .settings import Settings

__all__ = [
    # middleware and set-up
    "PrometheusMetrics",
    "exposition_env",
    # the billing metrics
    "BillingMetrics",
    "get_billing_metrics",
    "LATENCY_BUCKETS_S",
    # calls from the money path
    "effect_committed",
    "duplicate_suppressed",
    "idempotency_conflict",
    "failure_recorded",
]

log = structlog.get_logger("billing.metrics")

#: Buckets of ``billing_enqueue_to_commit_seconds``, in seconds: from 1 ms
#: (an idle worker on a local network) to 60 s, past which a message has
#: waited in a backlog or through retries (backoff caps at 60 s by default).
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    float("inf"),
)

#: Ledger entry kind of the charge each charging outcome made.
CHARGE_KIND_OF_OUTCOME = {
    "subscribed": "subscription_charge",
    "renewed": "renewal_charge",
    "usage_recorded": "usage_charge",
}

#: ``billing_top_ups_total`` status of each final ``auto_top_up`` outcome.
TOP_UP_STATUS_OF_OUTCOME = {
    "topped_up": "succeeded",
    "declined": "declined",
    "limit_reached": "limit_reached",
    "cap_reached": "cap_reached",
    "not_configured": "not_configured",
    "auto_top_up_disabled": "auto_top_up_disabled",
    "top_up_failed": "failed",
    "top_up_processing": "processing",
    "top_up_reconciling": "reconciling",
}

#: The ``actor`` label values known in advance: the contract's actors (:data:`tasks.messages.MESSAGE_MODELS`).
ACTOR_NAMES = tuple(MESSAGE_MODELS)

#: File name prefixes of prometheus_client's multiprocess files
#: (``counter_<pid>.db``, ``gauge_livesum_<pid>.db``...).
_MULTIPROCESS_FILE_PREFIXES = ("counter_", "gauge_", "histogram_", "summary_")


class BillingMetrics:
    """The billing metrics (see ``docs/metrics.md``).

    Parameters:
      registry: Where to register them (default: a registry of their own;
        in multiprocess mode the exposition reads the files, not a registry).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # imported here, not at module level: see the module docstring
        import prometheus_client as prom

        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self.charges: Counter = prom.Counter(
            "billing_charges",
            "Period charges committed to the ledger, by ledger entry kind.",
            ["kind"],
            registry=self.registry,
        )
        self.charged_micros: Counter = prom.Counter(
            "billing_charged_micros",
            "Sum of committed period charges, in micro-units of the account currency (all currencies added).",
            ["kind"],
            registry=self.registry,
        )
        self.duplicates: Counter = prom.Counter(
            "billing_duplicates_suppressed",
            "Deliveries of an already completed idempotency key, answered with the stored outcome.",
            ["actor"],
            registry=self.registry,
        )
        self.conflicts: Counter = prom.Counter(
            "billing_idempotency_conflicts",
            "Deliveries whose idempotency key was used before with other arguments (not applied).",
            ["actor"],
            registry=self.registry,
        )
        self.top_ups: Counter = prom.Counter(
            "billing_top_ups",
            "Final auto_top_up outcomes committed, by status.",
            ["status"],
            registry=self.registry,
        )
        self.revocations: Counter = prom.Counter(
            "billing_revocations",
            "API keys revoked by revoke_key.",
            registry=self.registry,
        )
        self.failures: Counter = prom.Counter(
            "billing_failures",
            "Messages recorded as failed: permanent errors and exhausted retries, by error code.",
            ["actor", "error"],
            registry=self.registry,
        )
        self.outcomes: Counter = prom.Counter(
            "billing_outcomes",
            "Committed effects (one per transaction that applied a message), by outcome.",
            ["actor", "outcome"],
            registry=self.registry,
        )
        self.enqueue_to_commit: Histogram = prom.Histogram(
            "billing_enqueue_to_commit_seconds",
            "Seconds from a message's enqueue (Dramatiq message_timestamp) to the commit of its effect.",
            ["actor"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        # known label values start at 0, so rate() and absent series need no first event
        for kind in CHARGE_KIND_OF_OUTCOME.values():
            self.charges.labels(kind=kind)
            self.charged_micros.labels(kind=kind)
        for status in TOP_UP_STATUS_OF_OUTCOME.values():
            self.top_ups.labels(status=status)
        for actor in ACTOR_NAMES:
            self.duplicates.labels(actor=actor)
            self.conflicts.labels(actor=actor)


_metrics: BillingMetrics | None = None
_metrics_lock = threading.Lock()


def get_billing_metrics() -> BillingMetrics:
    """The process's billing metrics, created on first use (in multiprocess mode if the directory is set)."""
    global _metrics
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = BillingMetrics()
    return _metrics


_P = ParamSpec("_P")


def _never_raises(record: Callable[_P, None]) -> Callable[_P, None]:
    @functools.wraps(record)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            record(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a metric never fails a message
            log.warning("metrics_error", metric_call=record.__name__, error=repr(exc))

    return wrapper


@_never_raises
def effect_committed(actor_name: str, effect: Effect) -> None:
    """Count a committed effect and observe its enqueue-to-commit latency.

    Call right after the transaction that applied ``effect`` committed
    (not for duplicates).  The latency is wall-clock time (not the money
    path's injected clock) since the current Dramatiq message's
    ``message_timestamp``, in seconds; nothing is observed outside a Dramatiq
    message (a direct ``BillingService.handle`` call).
    """
    m = get_billing_metrics()
    outcome = effect.outcome
    m.outcomes.labels(actor=actor_name, outcome=outcome).inc()
    if (kind := CHARGE_KIND_OF_OUTCOME.get(outcome)) is not None:
        m.charges.labels(kind=kind).inc()
        m.charged_micros.labels(kind=kind).inc(int(effect.result.get("charged_micros", 0)))
    elif (
        actor_name == AutoTopUpMessage.actor_name
        and (status := TOP_UP_STATUS_OF_OUTCOME.get(outcome)) is not None
    ):
        m.top_ups.labels(status=status).inc()
    elif outcome == "revoked":
        m.revocations.inc(len(effect.result.get("key_ids", ())))
    message = CurrentMessage.get_current_message()
    if message is not None:
        # message_timestamp: milliseconds since the epoch, set by the producer's
        # clock at enqueue (kept across retries); skew is clamped at 0
        latency_s = max(0.0, time.time() - message.message_timestamp / 1000)
        m.enqueue_to_commit.labels(actor=actor_name).observe(latency_s)


@_never_raises
def duplicate_suppressed(actor_name: str) -> None:
    """Count a delivery answered with a completed key's stored outcome (nothing applied)."""
    get_billing_metrics().duplicates.labels(actor=actor_name).inc()


@_never_raises
def idempotency_conflict(actor_name: str) -> None:
    """Count a delivery whose key was used before with other arguments."""
    get_billing_metrics().conflicts.labels(actor=actor_name).inc()


@_never_raises
def failure_recorded(actor_name: str, exc: BaseException) -> None:
    """Count a failed message, labelled with the error code of ``failed_messages.error_type``."""
    error = exc.code if isinstance(exc, BillingError) else type(exc).__name__
    get_billing_metrics().failures.labels(actor=actor_name, error=error).inc()


class PrometheusMetrics(Middleware):
    """Dramatiq's Prometheus middleware, started at process boot, plus the billing metrics.

    In a ``dramatiq`` worker process, ``after_process_boot`` creates
    Dramatiq's :class:`~dramatiq.middleware.prometheus.Prometheus` (which
    switches prometheus_client to multiprocess mode) and then the billing
    metrics, and the master process forks Dramatiq's exposition server.
    An in-process ``dramatiq.Worker`` never boots a process: there this
    middleware does nothing, and the billing metrics stay in memory.
    """

    def __init__(self) -> None:
        self.prometheus: Prometheus | None = None

    @property
    def forks(self) -> list[Callable[[], int]]:
        """Dramatiq's exposition server, once booted (the CLI reads forks after process boot)."""
        if self.prometheus is None:
            return []
        return list(self.prometheus.forks)

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        from dramatiq.middleware.prometheus import Prometheus

        prometheus = Prometheus()
        prometheus.after_process_boot(broker)
        self.prometheus = prometheus
        get_billing_metrics()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.prometheus is not None:
            self.prometheus.after_worker_shutdown(broker, worker)

    def after_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if self.prometheus is not None:
            self.prometheus.after_nack(broker, message)

    def after_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int) -> None:
        if self.prometheus is not None:
            self.prometheus.after_enqueue(broker, message, delay)

    def before_delay_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if self.prometheus is not None:
            self.prometheus.before_delay_message(broker, message)

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if self.prometheus is not None:
            self.prometheus.before_process_message(broker, message)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        if self.prometheus is not None:
            self.prometheus.after_process_message(broker, message, result=result, exception=exception)

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if self.prometheus is not None:
            self.prometheus.after_skip_message(broker, message)


def exposition_env(settings: Settings) -> dict[str, str]:
    """Environment that points Dramatiq's Prometheus middleware at our endpoint and directory.

    ``BILLING_METRICS_DIR`` is emptied of prometheus_client's files first
    (counters restart at zero with the worker, as Prometheus expects; stale
    files would add a previous run's counts).  Unset, a fresh temporary
    directory is made for this start (Dramatiq's own default,
    ``<tmp>/dramatiq-prometheus``, is shared by every run and never emptied).

    Returns:
      ``dramatiq_prom_db`` and ``PROMETHEUS_MULTIPROC_DIR`` (the directory),
      ``dramatiq_prom_host`` and ``dramatiq_prom_port``.

    Raises:
      OSError: The directory cannot be created or emptied.
    """
    if settings.metrics_dir:
        path = Path(settings.metrics_dir)
        path.mkdir(parents=True, exist_ok=True)
        for file in path.glob("*.db"):
            if file.name.startswith(_MULTIPROCESS_FILE_PREFIXES):
                file.unlink(missing_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="billing-metrics-"))
    directory = os.fspath(path.resolve())
    return {
        "dramatiq_prom_db": directory,
        "PROMETHEUS_MULTIPROC_DIR": directory,
        "dramatiq_prom_host": settings.metrics_host,
        "dramatiq_prom_port": str(settings.metrics_port),
    }
