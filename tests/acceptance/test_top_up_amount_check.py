"""An auto-top-up amount the provider could never charge is refused when it is set, not at charge time.

Through the CLI as an operator runs it: ``auto_top_up_amount_micros`` is
checked against the account's currency when it is set.  The rule is the
provider's own (:meth:`PaymentProvider.check_amount`; Stripe's is
:func:`workers.providers.stripe.to_minor_units`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tasks.errors import ProviderRejected
from tests.conftest import ROOT
from workers.providers import FakePaymentProvider, StripePaymentProvider
from workers.providers.stripe import to_minor_units

STRIPE = {"BILLING_PAYMENT_PROVIDER": "stripe"}  # no API key needed: the check makes no request


def billing(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def create(
    account_id: str, currency: str, amount: int, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return billing(
        "account",
        "create",
        account_id,
        "--currency",
        currency,
        "--auto-top-up-threshold-micros",
        "1000000",
        "--auto-top-up-amount-micros",
        str(amount),
        "--payment-method",
        "cus_RkT2x9QvLm3Ab1/pm_1QxR1aLkdIwHu7ixVb4Kc9Ze",
        env=env,
    )


@pytest.mark.parametrize(
    ("currency", "amount", "why"),
    [
        ("USD", 1_234_567, "not a whole number of minor units"),  # 123.4567 cents
        ("JPY", 1_500_000, "not a whole number of minor units"),  # 1.5 yen
        ("KWD", 5_124_000, "must end in 0"),  # 5.124 KWD: Stripe's three-decimal rule
        ("ISK", 1_500_000, "must be whole units"),  # 1.50 ISK: whole krona only
    ],
)
def test_account_create_refuses_an_amount_stripe_cannot_charge(services, db, currency, amount, why):
    done = create("acct-bad", currency, amount, env=STRIPE)

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("billing: error: --auto-top-up-amount-micros: stripe: ")
    assert why in done.stderr
    assert db("SELECT id FROM accounts") == []


def test_account_create_takes_a_whole_number_of_minor_units(services, db):
    assert create("acct-usd", "USD", 1_230_000, env=STRIPE).returncode == 0  # 1.23 USD
    assert create("acct-jpy", "JPY", 500_000_000, env=STRIPE).returncode == 0  # 500 yen
    assert db("SELECT id, auto_top_up_amount_micros FROM accounts ORDER BY id") == [
        {"id": "acct-jpy", "auto_top_up_amount_micros": 500_000_000},
        {"id": "acct-usd", "auto_top_up_amount_micros": 1_230_000},
    ]


def test_the_fake_provider_takes_any_positive_amount(services):
    assert create("acct-fake", "USD", 1_234_567).returncode == 0


def test_account_auto_top_up_refuses_an_amount_stripe_cannot_charge_in_the_accounts_currency(services, db):
    assert create("acct-1", "USD", 20_000_000, env=STRIPE).returncode == 0

    done = billing("account", "auto-top-up", "acct-1", "--amount-micros", "1234567", env=STRIPE)

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert (
        "--amount-micros: stripe: 1234567 micros of USD is not a whole number of minor units" in done.stderr
    )
    assert db("SELECT auto_top_up_amount_micros FROM accounts") == [{"auto_top_up_amount_micros": 20_000_000}]
    ok = billing("account", "auto-top-up", "acct-1", "--amount-micros", "1230000", env=STRIPE)
    assert ok.returncode == 0, ok.stderr
    assert db("SELECT auto_top_up_amount_micros FROM accounts") == [{"auto_top_up_amount_micros": 1_230_000}]
    # an unknown account is still its own error, not the amount's
    unknown = billing("account", "auto-top-up", "nobody", "--amount-micros", "1234567", env=STRIPE)
    assert unknown.returncode == 2 and "nobody" in unknown.stderr, unknown.stderr


def test_check_amount_is_the_providers_one_rule():
    FakePaymentProvider.check_amount(1, "USD")
    with pytest.raises(ProviderRejected):
        FakePaymentProvider.check_amount(0, "USD")
    for amount, currency in ((1_230_000, "usd"), (1_234_567, "USD"), (5_124_000, "KWD"), (0, "USD")):
        try:
            to_minor_units(amount, currency)
        except ProviderRejected as expected:
            with pytest.raises(ProviderRejected, match=str(expected).split(":")[-1].strip()[:20]):
                StripePaymentProvider.check_amount(amount, currency)
        else:
            StripePaymentProvider.check_amount(amount, currency)
