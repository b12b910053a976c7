"""Initial schema: the SPEC's tables, constraints and indexes.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from migrations.sql import execute_script

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE accounts (
    id                            text PRIMARY KEY,
    currency                      char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    balance_micros                bigint NOT NULL DEFAULT 0,
    auto_top_up_enabled           boolean NOT NULL DEFAULT false,
    auto_top_up_threshold_micros  bigint,
    auto_top_up_amount_micros     bigint,
    payment_method_ref            text,
    auto_top_up_consecutive_declines integer NOT NULL DEFAULT 0,
    auto_top_up_disabled_reason   text,
    created_at                    timestamptz NOT NULL DEFAULT now(),
    updated_at                    timestamptz NOT NULL DEFAULT now(),
    -- the last line of defence, not the mechanism (SPEC "Money")
    CONSTRAINT accounts_balance_non_negative CHECK (balance_micros >= 0),
    CONSTRAINT accounts_top_up_threshold_range CHECK (auto_top_up_threshold_micros IS NULL OR auto_top_up_threshold_micros BETWEEN 0 AND 1000000000000000),
    CONSTRAINT accounts_top_up_amount_range CHECK (auto_top_up_amount_micros IS NULL OR auto_top_up_amount_micros BETWEEN 1 AND 1000000000000000),
    CONSTRAINT accounts_top_up_configured CHECK (
        NOT auto_top_up_enabled
        OR (auto_top_up_amount_micros IS NOT NULL AND auto_top_up_threshold_micros IS NOT NULL AND payment_method_ref IS NOT NULL))
);

CREATE TABLE plans (
    id              text PRIMARY KEY,
    name            text NOT NULL,
    price_micros    bigint NOT NULL CHECK (price_micros BETWEEN 1 AND 1000000000000000),
    currency        char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    interval        text NOT NULL CHECK (interval IN ('month', 'day')),
    interval_count  integer NOT NULL DEFAULT 1 CHECK (interval_count BETWEEN 1 AND 366),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE subscriptions (
    id                    text PRIMARY KEY,
    account_id            text NOT NULL REFERENCES accounts (id),
    plan_id               text NOT NULL REFERENCES plans (id),
    status                text NOT NULL CHECK (status IN ('active', 'past_due', 'canceled')),
    -- calendar anchor: period n ends at anchor + n intervals (Jan 31 -> Feb 28 -> Mar 31)
    billing_anchor        timestamptz NOT NULL,
    period_index          integer NOT NULL DEFAULT 0,
    current_period_start  timestamptz NOT NULL,
    current_period_end    timestamptz NOT NULL,
    cancel_at_period_end  boolean NOT NULL DEFAULT false,
    canceled_at           timestamptz,
    cancel_reason         text,
    created_by_key        text NOT NULL UNIQUE,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT subscriptions_period_order CHECK (current_period_end > current_period_start),
    CONSTRAINT subscriptions_canceled_at CHECK ((status = 'canceled') = (canceled_at IS NOT NULL))
);
-- at most one non-canceled subscription per (account, plan)
CREATE UNIQUE INDEX subscriptions_one_live_per_account_plan
    ON subscriptions (account_id, plan_id) WHERE status <> 'canceled';
-- the scheduler's scan: due subscriptions by period end
CREATE INDEX subscriptions_due ON subscriptions (current_period_end) WHERE status IN ('active', 'past_due');

CREATE TABLE api_keys (
    id               text PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts (id),
    subscription_id  text REFERENCES subscriptions (id),
    source           text NOT NULL CHECK (source IN ('managed', 'user')),
    prefix           text NOT NULL UNIQUE,
    key_hash         text NOT NULL,
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    revoked_at       timestamptz,
    revoke_reason    text,
    CONSTRAINT api_keys_managed_has_subscription CHECK (source = 'user' OR subscription_id IS NOT NULL),
    CONSTRAINT api_keys_revoked_at CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);
CREATE INDEX api_keys_account ON api_keys (account_id);
CREATE INDEX api_keys_subscription ON api_keys (subscription_id) WHERE subscription_id IS NOT NULL;

CREATE TABLE top_up_attempts (
    id                        text PRIMARY KEY,
    account_id                text NOT NULL REFERENCES accounts (id),
    message_idempotency_key   text NOT NULL UNIQUE,
    provider_idempotency_key  text NOT NULL UNIQUE,
    amount_micros             bigint NOT NULL CHECK (amount_micros BETWEEN 1 AND 1000000000000000),
    currency                  char(3) NOT NULL,
    payment_method_ref        text NOT NULL,
    billing_period            text NOT NULL,
    status                    text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'declined', 'failed')),
    recovery_point            text NOT NULL DEFAULT 'started' CHECK (recovery_point IN ('started', 'finished')),
    provider_charge_id        text UNIQUE,
    decline_reason            text,
    last_error                text,
    reason                    text,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX top_up_attempts_account_period ON top_up_attempts (account_id, billing_period);

CREATE TABLE ledger_entries (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id         text NOT NULL REFERENCES accounts (id),
    amount_micros      bigint NOT NULL CHECK (amount_micros <> 0 AND abs(amount_micros) <= 1000000000000000),
    kind               text NOT NULL CHECK (kind IN ('top_up', 'subscription_charge', 'renewal_charge', 'refund', 'adjustment')),
    subscription_id    text REFERENCES subscriptions (id),
    period_start       timestamptz,
    top_up_attempt_id  text UNIQUE REFERENCES top_up_attempts (id),
    idempotency_key    text NOT NULL UNIQUE,
    created_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_charge_has_period CHECK (
        kind NOT IN ('subscription_charge', 'renewal_charge') OR (subscription_id IS NOT NULL AND period_start IS NOT NULL AND amount_micros < 0)),
    CONSTRAINT ledger_top_up_has_attempt CHECK (kind <> 'top_up' OR (top_up_attempt_id IS NOT NULL AND amount_micros > 0))
);
CREATE INDEX ledger_entries_account ON ledger_entries (account_id, id);
-- a period is charged at most once, whatever the message key
CREATE UNIQUE INDEX ledger_one_charge_per_period
    ON ledger_entries (subscription_id, period_start) WHERE kind IN ('subscription_charge', 'renewal_charge');

CREATE TABLE idempotency_keys (
    key           text PRIMARY KEY,
    kind          text NOT NULL,
    fingerprint   text NOT NULL,
    status        text NOT NULL CHECK (status IN ('processing', 'waiting_for_funds', 'completed', 'failed', 'dead')),
    result        jsonb,
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text,
    account_id    text,
    message_id    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz
);
CREATE INDEX idempotency_keys_account ON idempotency_keys (account_id);

-- messages that wait for a top-up to finish; resumed (re-sent with the same key) after it
CREATE TABLE funds_waits (
    idempotency_key  text PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts (id),
    actor_name       text NOT NULL,
    queue_name       text NOT NULL,
    kwargs           jsonb NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX funds_waits_account ON funds_waits (account_id);

-- transactional outbox: messages written with the effect, relayed to Redis after commit
CREATE TABLE outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   text NOT NULL UNIQUE,
    queue_name   text NOT NULL,
    actor_name   text NOT NULL,
    kwargs       jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- entitlement projection for read replicas: one plain SELECT, no views or functions
CREATE TABLE entitlements (
    account_id          text NOT NULL REFERENCES accounts (id),
    plan_id             text NOT NULL REFERENCES plans (id),
    subscription_id     text NOT NULL REFERENCES subscriptions (id),
    status              text NOT NULL,
    entitled            boolean NOT NULL,
    current_period_end  timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, plan_id)
);

-- failures visible to operators after Redis's dead-letter retention has passed
CREATE TABLE failed_messages (
    message_id       text PRIMARY KEY,
    actor_name       text NOT NULL,
    queue_name       text NOT NULL,
    kwargs           jsonb,
    idempotency_key  text,
    account_id       text,
    error_type       text NOT NULL,
    error_message    text NOT NULL,
    traceback        text,
    attempts         integer NOT NULL DEFAULT 1,
    status           text NOT NULL DEFAULT 'dead' CHECK (status IN ('dead', 'retried', 'resolved')),
    first_seen_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX failed_messages_last_seen ON failed_messages (last_seen_at DESC);
CREATE INDEX failed_messages_key ON failed_messages (idempotency_key);

-- storage of FakePaymentProvider (the provider's side, not ours); unused with a real provider
CREATE TABLE fake_provider_charges (
    idempotency_key     text PRIMARY KEY,
    charge_id           text NOT NULL UNIQUE,
    payment_method_ref  text NOT NULL,
    amount_micros       bigint NOT NULL,
    currency            char(3) NOT NULL,
    status              text NOT NULL CHECK (status IN ('succeeded', 'declined')),
    decline_code        text,
    calls               integer NOT NULL DEFAULT 1,
    created_at          timestamptz NOT NULL DEFAULT now()
);
"""

DOWNGRADE = """
DROP TABLE fake_provider_charges, failed_messages, entitlements, outbox, funds_waits, idempotency_keys,
    ledger_entries, top_up_attempts, api_keys, subscriptions, plans, accounts;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
