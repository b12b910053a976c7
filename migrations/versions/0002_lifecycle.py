"""Subscription lifecycle: past_due with grace and dunning, auto-top-up caps and self-disable.

Expand-only (SPEC "Deployment"): new nullable or defaulted columns and new
indexes; a worker running the previous revision keeps working.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from migrations.sql import execute_script

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE subscriptions
    ADD COLUMN past_due_since    timestamptz,
    ADD COLUMN grace_ends_at     timestamptz,
    ADD COLUMN dunning_attempts  integer NOT NULL DEFAULT 0,
    ADD COLUMN next_retry_at     timestamptz;
-- the scheduler's two scans: renewals of active subscriptions by period end,
-- dunning retries of past_due ones by their next retry time
CREATE INDEX subscriptions_renewal_due ON subscriptions (current_period_end) WHERE status = 'active';
CREATE INDEX subscriptions_dunning_due ON subscriptions (next_retry_at) WHERE status = 'past_due';

ALTER TABLE accounts
    ADD COLUMN auto_top_up_monthly_cap_micros bigint
        CONSTRAINT accounts_top_up_monthly_cap_range
        CHECK (auto_top_up_monthly_cap_micros IS NULL OR auto_top_up_monthly_cap_micros BETWEEN 1 AND 1000000000000000),
    ADD COLUMN auto_top_up_disabled_at timestamptz,
    -- a cap below one top-up would refuse every top-up: a misconfiguration
    ADD CONSTRAINT accounts_top_up_cap_covers_amount CHECK (
        auto_top_up_monthly_cap_micros IS NULL OR auto_top_up_amount_micros IS NULL
        OR auto_top_up_monthly_cap_micros >= auto_top_up_amount_micros);

ALTER TABLE entitlements ADD COLUMN grace_ends_at timestamptz
"""

DOWNGRADE = """
ALTER TABLE entitlements DROP COLUMN grace_ends_at;
ALTER TABLE accounts DROP CONSTRAINT accounts_top_up_cap_covers_amount, DROP COLUMN auto_top_up_disabled_at,
    DROP COLUMN auto_top_up_monthly_cap_micros;
DROP INDEX subscriptions_dunning_due;
DROP INDEX subscriptions_renewal_due;
ALTER TABLE subscriptions DROP COLUMN next_retry_at, DROP COLUMN dunning_attempts,
    DROP COLUMN grace_ends_at, DROP COLUMN past_due_since
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
