"""Worker settings, read from ``BILLING_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from db.config import check_url
from db.money import BillingPolicy
from tasks.errors import ConfigurationError
from tasks.signing import SigningKeys, signing_keys_from_env

from .middleware.shutdown import (
    DEFAULT_SHUTDOWN_TIMEOUT_MS,
    SHUTDOWN_TIMEOUT_ENV,
    shutdown_timeout_ms_from_env,
)

__all__ = ["RABBITMQ_SCHEMES", "REDIS_SCHEMES", "Settings", "get_settings"]


class Settings(BaseSettings):
    """Every knob of the worker, with the unit in its name.

    Redelivery (SPEC "Processing rules"): Dramatiq's Redis broker gives a
    dead worker's messages back only when its heartbeat is older than
    ``heartbeat_timeout_ms`` *and* a maintenance pass runs.  Stock Dramatiq
    runs maintenance on 0.1% of commands at random, which on a quiet queue
    can take hours; we also run it on each queue at least every ``maintenance_interval_ms``
    per process, so with the defaults a dead worker's messages are delivered
    again within about 35 seconds.
    """

    model_config = SettingsConfigDict(env_prefix="BILLING_", extra="ignore")

    database_url: str | None = None
    redis_url: str | None = None
    #: Chooses the broker: ``amqp://user:pass@host:5672/vhost`` (or ``amqps://``)
    #: RabbitMQ, ``redis://...`` Redis.  Unset: ``redis_url`` (Redis, the default).
    #: A Redis URL here also serves as ``redis_url`` when that is unset.
    broker_url: str | None = None

    #: A worker whose heartbeat is older than this is dead and its unacked
    #: messages are requeued (Dramatiq's default is 60 s; 30 s keeps
    #: redelivery within SPEC's minute with margin).
    heartbeat_timeout_ms: int = Field(30_000, ge=1_000)
    #: Run broker maintenance (requeue dead workers' messages) on each queue at least this
    #: often per process.
    maintenance_interval_ms: int = Field(5_000, ge=100)
    #: Dramatiq's random maintenance chance, per million commands (stock: 1000).
    maintenance_chance: int = Field(1_000, ge=0, le=1_000_000)
    #: Dead-lettered messages are kept in Redis this long (Dramatiq default: 7 days).
    dead_message_ttl_ms: int = Field(7 * 86_400_000, ge=60_000)

    #: Deliveries of one idempotency key, counted in PostgreSQL, after which
    #: it is dead-lettered as a poison message.  Dramatiq does not count a
    #: redelivery after a worker crash as a retry, so this is what bounds a
    #: message that kills its worker every time.
    max_deliveries: int = Field(10, ge=1)
    #: RabbitMQ only: ``x-delivery-limit`` of every queue and delay queue, the
    #: broker's own bound on poison messages behind ``max_deliveries``: a
    #: message returned to its queue more often (a worker died holding it, a
    #: consumer closed before it ran) is dead-lettered to ``.XQ``.  A worker
    #: stopping returns everything it prefetched, so keep it well above
    #: ``max_deliveries``.
    rabbitmq_delivery_limit: int = Field(20, ge=1)
    #: Apply plain renewals with the server-side fast path, grouped: the
    #: renewals that arrive together are claimed in one statement and applied
    #: in one (``renew_fast_batch`` in PostgreSQL, ``workers.group_commit``).  Off: every renewal runs
    #: the Python path in its own transaction.
    renew_fast_path: bool = True
    #: Apply usage events with the server-side fast path, grouped by account
    #: (``record_usage_batch`` in PostgreSQL): the events that arrive together
    #: are claimed in one statement and applied in one transaction, one account
    #: lock and one ledger entry per account.  Off: every event runs the Python
    #: path in its own transaction.
    usage_fast_path: bool = True
    #: Most messages per group commit, and per batch of a batch thread
    #: (256 measured faster than 64 and 512 for usage, as fast for renewals).
    max_batch: int = Field(256, ge=1, le=10_000)
    #: PostgreSQL connections kept open per worker process; ``billing worker``
    #: sets it to its threads + 4 (each thread may hold one; the outbox sweeper,
    #: a renewal batch and a usage batch, which holds two, need their own)
    #: unless it is set.
    db_pool_size: int = Field(10, ge=1, le=500)
    #: Group commits of one worker process at PostgreSQL at once.
    max_batches_in_flight: int = Field(1, ge=1, le=64)
    #: Queues whose messages are processed in batches on the event loop, by
    #: batch threads instead of the worker's threads (comma-separated; empty:
    #: none).  Suits a queue whose kinds are quick and arrive by the thousand;
    #: not ``billing.payments``, whose provider calls would hold a batch.
    batch_queues: str = "billing,billing.usage"
    #: Batch threads per worker process (each takes up to ``max_batch``
    #: messages at once; with two, one batch gathers while one is at PostgreSQL).
    batch_threads: int = Field(2, ge=1, le=16)
    #: Retries of transient errors (Dramatiq Retries middleware).
    max_retries: int = Field(8, ge=0)
    #: Backoff of those retries: exponential from min to max, with jitter.
    min_backoff_ms: int = Field(250, ge=1)
    max_backoff_ms: int = Field(60_000, ge=1)

    #: Auto-top-ups per account per top-up period (a calendar month in UTC).
    top_ups_per_period: int = Field(1, ge=1)
    #: Consecutive declined top-ups after which an account's auto-top-up
    #: switches itself off (0: never).
    top_up_disable_after_declines: int = Field(3, ge=0)

    #: A renewal that cannot be paid leaves the subscription ``past_due`` for
    #: this long (from the first failed attempt), then it is canceled.
    grace_period_ms: int = Field(3 * 86_400_000, ge=0)
    #: Dunning: retry a past_due renewal this long after the first failed
    #: attempt (JSON list; the end of grace is always the last retry).
    dunning_schedule_ms: list[int] = Field(
        default_factory=lambda: [86_400_000, 2 * 86_400_000, 3 * 86_400_000]
    )

    #: Deadlines of the states that wait (docs/lifecycle.md "States that wait").  A key in
    #: ``processing`` belongs to its delivery this long; past it the completer
    #: (each scheduler pass) re-sends it from what the database knows, up to
    #: ``max_redrives`` times, then ends it as failed for operators.
    key_lease_ms: int = Field(15 * 60_000, ge=1_000)
    max_redrives: int = Field(3, ge=0)
    #: A top-up attempt still pending this long after it was recorded is
    #: reconciled: looked up at the provider by its idempotency key.
    top_up_deadline_ms: int = Field(10 * 60_000, ge=1_000)
    #: The reconciler looks again at a top-up the provider calls processing this often.
    top_up_processing_poll_ms: int = Field(3_600_000, ge=1_000)
    #: Held before each charge request; longer than any provider call's timeout.
    charge_lease_ms: int = Field(120_000, ge=1_000)

    #: ``billing scheduler``: time between two passes.
    scheduler_interval_ms: int = Field(60_000, ge=100)
    #: Renew a period this long before it ends (0: at period end).
    renewal_lead_ms: int = Field(0, ge=0)
    #: Due subscriptions read and enqueued per batch (one pipelined Redis round trip each).
    scheduler_batch_size: int = Field(1_000, ge=1, le=100_000)
    #: A due renewal the scheduler enqueued is not enqueued again for this long,
    #: nor while the broker still holds its message (a lost one goes out again
    #: after it).  0: at every pass once its message is gone.
    scheduler_resend_after_ms: int = Field(300_000, ge=0)
    #: A renewal the broker has held this long since the scheduler enqueued it is
    #: enqueued again all the same (one copy per this long; below the audit's 1 h).
    scheduler_hold_max_ms: int = Field(1_800_000, ge=1_000)

    #: ``billing dashboard``: the token operators log in with (16 characters
    #: at least; ``openssl rand -hex 32``).  Unset: the dashboard starts only
    #: with ``--dev`` on 127.0.0.1, without a login.
    dashboard_token: SecretStr | None = None
    #: Signs the dashboard's session cookie.  Unset: derived from the token,
    #: so changing the token logs every operator out.
    dashboard_secret: SecretStr | None = None
    #: A dashboard login lasts this long (8 hours: a working day).
    dashboard_session_max_age_ms: int = Field(8 * 3_600_000, ge=60_000)
    #: Send the session cookie over HTTPS only (set it behind a TLS proxy).
    dashboard_cookie_secure: bool = False

    #: Outbox rows older than this were left by a worker that died between
    #: commit and relay; the sweeper of every worker relays them.
    outbox_sweep_after_ms: int = Field(10_000, ge=100)
    outbox_sweep_interval_ms: int = Field(5_000, ge=100)

    #: ``fake`` (default, ships with the code) or ``stripe`` (``stripe_*`` below).
    payment_provider: str = "fake"
    fake_decline_rate: float = Field(0.0, ge=0, le=1)
    fake_error_rate: float = Field(0.0, ge=0, le=1)
    fake_timeout_rate: float = Field(0.0, ge=0, le=1)
    fake_latency_ms: int = Field(0, ge=0)
    fake_seed: int | None = None
    #: How long the fake provider keeps a ``pm_processing*`` charge processing (2 days, a bank debit).
    fake_processing_ms: int = Field(2 * 86_400_000, ge=0)
    #: Stripe secret key (``sk_live_...``/``sk_test_...``); required when
    #: ``payment_provider`` is ``stripe``.  A SecretStr, so it is never logged.
    stripe_api_key: SecretStr | None = None
    #: Override of Stripe's API URL (default ``https://api.stripe.com``), e.g.
    #: ``http://localhost:12111`` for stripe-mock.
    stripe_api_base: str | None = None
    #: Connect and read timeout of one Stripe request; past it the charge is a
    #: ``ProviderTimeout`` (it may have happened) and is retried with the same key.
    stripe_timeout_ms: int = Field(20_000, ge=100)

    #: ``json`` (production) or ``console``.
    log_format: str = "json"
    log_level: str = "INFO"

    #: Crash points (``name`` or ``name:key-substring``, comma separated) at
    #: which the worker process exits at once; for crash tests only.
    crashpoints: str = ""

    #: Serve Prometheus metrics from worker processes (Dramatiq's and the
    #: billing metrics on one endpoint, ``docs/metrics.md``).
    metrics_enabled: bool = True
    #: Address of the ``/metrics`` endpoint (Dramatiq's ``dramatiq_prom_host``/``_port``).
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(9191, ge=1, le=65_535)
    #: prometheus_client's multiprocess directory (one per running ``billing
    #: worker``; emptied of its metric files at start).  Unset: a fresh
    #: temporary directory for each start.
    metrics_dir: str | None = None

    #: The subscriber's X25519 public key (standard base64 of 32 bytes; ``billing keys
    #: generate-keypair``) that issued API keys are sealed to and kept in
    #: PostgreSQL until acknowledged (docs/operations.md "API key delivery").  Unset: the
    #: pub/sub delivery, which loses a key nobody is listening for; the
    #: worker warns loudly at start-up.
    key_delivery_public_key: str | None = None
    #: A sealed key delivery not acknowledged this long after it was written
    #: is flagged by ``billing audit`` (24 hours).
    key_delivery_deadline_ms: int = Field(86_400_000, ge=60_000)

    #: Message signing (:mod:`tasks.signing`): a JSON object of key id -> secret
    #: (32 characters at least each).  Set: every message this process
    #: creates is signed, and workers apply only messages with a valid
    #: signature.  Unset: nothing is signed or checked; the worker warns at start-up.
    signing_keys: SecretStr | None = None
    #: The key of ``signing_keys`` new signatures use (default: the only one).
    signing_key_id: str | None = None
    #: ``billing worker``: a worker process stops within this long of a stop
    #: signal (plus 2 s for Dramatiq to requeue what it prefetched), in milliseconds.
    worker_shutdown_timeout_ms: int = DEFAULT_SHUTDOWN_TIMEOUT_MS

    #: Who acts from the CLI, recorded in the operators' audit log (``operator_actions``);
    #: unset: ``{unix user}@{host}``.
    operator: str | None = None
    #: Where ``billing`` keeps its embedded PostgreSQL when ``database_url`` is unset.
    local_dir: str = ".billing"
    #: The CLI re-raises an unexpected error with its traceback instead of one line.
    debug: bool = False

    def billing_policy(self) -> BillingPolicy:
        """The money path's rules (:class:`db.money.BillingPolicy`) from these settings."""
        return BillingPolicy(
            top_ups_per_period=self.top_ups_per_period,
            disable_after_declines=self.top_up_disable_after_declines,
            grace_period=timedelta(milliseconds=self.grace_period_ms),
            dunning_schedule=tuple(timedelta(milliseconds=ms) for ms in self.dunning_schedule_ms),
            key_lease=timedelta(milliseconds=self.key_lease_ms),
            max_redrives=self.max_redrives,
            top_up_deadline=timedelta(milliseconds=self.top_up_deadline_ms),
            processing_poll=timedelta(milliseconds=self.top_up_processing_poll_ms),
            charge_lease=timedelta(milliseconds=self.charge_lease_ms),
            key_delivery_public_key=self.key_delivery_public_key or None,
            key_delivery_deadline=timedelta(milliseconds=self.key_delivery_deadline_ms),
        )

    def message_broker_url(self) -> str | None:
        """The broker's URL: ``BILLING_BROKER_URL``, else ``BILLING_REDIS_URL``; None when neither is set."""
        return self.broker_url or self.redis_url

    def broker_kind(self) -> str:
        """``"rabbitmq"`` for an ``amqp://``/``amqps://`` broker URL, else ``"redis"`` (the default)."""
        url = self.message_broker_url()
        return "rabbitmq" if url and urlsplit(url).scheme in RABBITMQ_SCHEMES else "redis"

    def batch_queue_names(self) -> frozenset[str]:
        """``batch_queues`` as a set of queue names."""
        return frozenset(name.strip() for name in self.batch_queues.split(",") if name.strip())

    def message_signing_keys(self) -> SigningKeys | None:
        """The signing keys (``BILLING_SIGNING_KEYS`` / ``BILLING_SIGNING_KEY_ID``); None when unset.

        Parsed by :func:`tasks.signing.signing_keys_from_env`, the producers'
        own reader, so a worker and a producer read the same value the same way.

        Raises:
          ConfigurationError: Not a JSON object of strings, a short secret, or an unknown signing key id.
        """
        if self.signing_keys is None:
            return None
        env = {"BILLING_SIGNING_KEYS": self.signing_keys.get_secret_value()}
        if self.signing_key_id:
            env["BILLING_SIGNING_KEY_ID"] = self.signing_key_id
        return signing_keys_from_env(env)

    # ----------------------------------------------------------------- checks at start-up

    @field_validator("worker_shutdown_timeout_ms", mode="before")
    @classmethod
    def _shutdown_timeout_can_work(cls, value: Any) -> int:
        try:
            return shutdown_timeout_ms_from_env({SHUTDOWN_TIMEOUT_ENV: str(value)})
        except ConfigurationError as exc:
            raise ValueError(exc.message) from None

    @field_validator("database_url")
    @classmethod
    def _database_url_can_work(cls, value: str | None) -> str | None:
        if value:
            try:
                check_url(value)
            except ConfigurationError as exc:
                raise ValueError(exc.message) from None
        return value or None

    @field_validator("broker_url")
    @classmethod
    def _broker_url_can_work(cls, value: str | None) -> str | None:
        if value:
            scheme = urlsplit(value).scheme
            if scheme in REDIS_SCHEMES:
                _check_redis_url(value, "BILLING_BROKER_URL")
            elif scheme not in RABBITMQ_SCHEMES:
                raise ValueError(
                    "BILLING_BROKER_URL must be an amqp:// or amqps:// URL (RabbitMQ) or a redis://,"
                    f" rediss:// or unix:// URL (Redis) (got scheme {scheme!r})"
                )
        return value or None

    @field_validator("redis_url")
    @classmethod
    def _redis_url_can_work(cls, value: str | None) -> str | None:
        if value:
            _check_redis_url(value, "BILLING_REDIS_URL")
        return value or None

    @model_validator(mode="after")
    def _combinations_can_work(self) -> Self:
        if self.broker_url and self.broker_kind() == "redis":
            if self.redis_url is None:
                self.redis_url = self.broker_url
            elif self.redis_url != self.broker_url:
                raise ValueError(
                    "BILLING_BROKER_URL and BILLING_REDIS_URL name two different Redis URLs: set one"
                )
        if self.min_backoff_ms > self.max_backoff_ms:
            raise ValueError(
                f"BILLING_MIN_BACKOFF_MS ({self.min_backoff_ms}) is above BILLING_MAX_BACKOFF_MS"
                f" ({self.max_backoff_ms}): retries cannot back off"
            )
        not_positive = [ms for ms in self.dunning_schedule_ms if ms <= 0]
        if not_positive:
            raise ValueError(
                "BILLING_DUNNING_SCHEDULE_MS: each retry comes after the failed renewal, so offsets are"
                f" positive (got {', '.join(map(str, not_positive))})"
            )
        if self.log_format not in ("json", "console"):
            raise ValueError(f"BILLING_LOG_FORMAT must be json or console (got {self.log_format!r})")
        return self

    def notices(self) -> list[str]:
        """Settings that work but do not do what they seem to: one sentence each (empty when none).

        Today: dunning offsets beyond the grace period, which are never used
        (the end of grace is always the last retry); with a zero grace
        period an unpaid renewal cancels at once and no offset is used.
        """
        beyond = [ms for ms in self.dunning_schedule_ms if ms > self.grace_period_ms]
        if not beyond:
            return []
        listed = ", ".join(map(str, beyond))
        if self.grace_period_ms == 0:
            return [
                "BILLING_GRACE_PERIOD_MS is 0: an unpaid renewal cancels the subscription at once"
                f" (canceled_unpaid), and the BILLING_DUNNING_SCHEDULE_MS offsets are ignored ({listed})"
            ]
        return [
            f"BILLING_DUNNING_SCHEDULE_MS offsets beyond BILLING_GRACE_PERIOD_MS ({self.grace_period_ms})"
            f" are ignored: {listed} (the end of grace is always the last retry)"
        ]

    @classmethod
    def checked(cls, **values: Any) -> Settings:
        """Read the settings (the environment, then ``values``) and check them against each other.

        Raises:
          ConfigurationError: One line naming the first ``BILLING_*`` variable
            that cannot work, alone or with another one (``and N more`` when
            several are wrong).
        """
        try:
            return cls(**values)
        except ValidationError as exc:
            errors = exc.errors()
            first = errors[0]
            message = str(first["msg"]).removeprefix("Value error, ")
            if first["loc"] and not message.startswith("BILLING_"):
                message = f"BILLING_{str(first['loc'][0]).upper()}: {message}"
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ConfigurationError(message + more) from None


class _ProcessSettings:
    """:func:`get_settings`: the settings read once per value of the ``BILLING_*`` environment."""

    def __init__(self) -> None:
        self._read: dict[tuple[tuple[str, str], ...], Settings] = {}

    def __call__(self) -> Settings:
        """The process's settings, read once and checked (:meth:`Settings.checked`).

        Read again only when a ``BILLING_*`` variable has changed since (a
        test's or a harness's environment); each of :meth:`Settings.notices`
        is printed once on stderr as ``billing: warning: ...``.

        Raises:
          ConfigurationError: A setting, or a combination of settings, that cannot work.
        """
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX)))
        settings = self._read.get(env)
        if settings is None:
            settings = Settings.checked()
            for notice in settings.notices():
                print(f"billing: warning: {notice}", file=sys.stderr)
            self._read = {env: settings}
        return settings

    def cache_clear(self) -> None:
        """Read the settings again on the next call."""
        self._read = {}


def _check_redis_url(value: str, env: str) -> None:
    """Raise ValueError (one line naming ``env``) for a Redis URL that cannot work."""
    parts = urlsplit(value)
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError(f"{env} must be a redis://, rediss:// or unix:// URL (got scheme {parts.scheme!r})")
    if parts.scheme != "unix":
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 1 <= port <= 65_535:
            raise ValueError(f"{env}: the port must be a number from 1 to 65535")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"{env}: the database must be a number (got {db!r})")


#: URL schemes of a Redis broker, and of a RabbitMQ one (``BILLING_BROKER_URL``).
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
RABBITMQ_SCHEMES = frozenset({"amqp", "amqps"})

#: The prefix of every setting's environment variable.
ENV_PREFIX = "BILLING_"

get_settings = _ProcessSettings()
