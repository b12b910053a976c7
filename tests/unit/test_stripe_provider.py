"""StripePaymentProvider against recorded Stripe responses; no network.

A fake ``stripe.HTTPClient`` records each request the library sends and
answers with a recorded response body from ``tests/fixtures/stripe/``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import stripe
from pydantic import SecretStr
from requests.structures import CaseInsensitiveDict

from tasks.errors import ConfigurationError, PermanentError, ProviderError, ProviderRejected, ProviderTimeout
from workers.providers import ChargeLookup, ChargeResult, StripePaymentProvider, make_provider
from workers.providers.stripe import minor_unit_exponent, parse_payment_method_ref, to_minor_units
from workers.settings import Settings

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "stripe"

CUSTOMER = "cus_RkT2x9QvLm3Ab1"
PAYMENT_METHOD = "pm_1QxR1aLkdIwHu7ixVb4Kc9Ze"
KEY = "top-up:0d6f1c2e-5b7a-4f0e-9a43-2f8e6c1b9d70"


@dataclass
class SentRequest:
    method: str
    path: str
    headers: dict[str, str]
    form: dict[str, str]


class RecordedStripeHTTPClient(stripe.HTTPClient):
    """Answers each request with the next recorded response: ``(status, fixture file)`` or an exception."""

    name = "recorded"

    def __init__(self, *responses: tuple[int, str] | Exception) -> None:
        super().__init__()
        self.responses = list(responses)
        self.sent: list[SentRequest] = []
        self.closed = False

    def request(
        self, method: str, url: str, headers: Any, post_data: Any = None, **_: Any
    ) -> tuple[str, int, Any]:
        form = {
            k: v[0]
            for k, v in parse_qs(post_data or "", keep_blank_values=True, strict_parsing=False).items()
        }
        self.sent.append(SentRequest(method.upper(), urlsplit(url).path, dict(headers or {}), form))
        assert self.responses, f"unexpected request {method.upper()} {url}"
        response = self.responses.pop(0)
        if isinstance(response, Exception):
            raise response
        status, fixture = response
        headers_out = CaseInsensitiveDict(
            {
                "Content-Type": "application/json",
                "Request-Id": f"req_recorded{len(self.sent)}",
                "Stripe-Version": "2026-10-28.endive",
            }
        )
        if headers and "Idempotency-Key" in headers:
            headers_out["Idempotency-Key"] = headers["Idempotency-Key"]
        return (FIXTURES / fixture).read_text(), status, headers_out

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def _no_stripe_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    # telemetry writes an id under ~/.config/stripe and adds a header; neither belongs in a unit test
    monkeypatch.setattr(stripe, "enable_telemetry", False)


def provider_with(
    *responses: tuple[int, str] | Exception,
) -> tuple[StripePaymentProvider, RecordedStripeHTTPClient]:
    http = RecordedStripeHTTPClient(*responses)
    return StripePaymentProvider("sk_test_4eC39HqLyjWDarjtT1zdp7dc", http_client=http), http


def charge(provider: StripePaymentProvider, **overrides: Any) -> ChargeResult:
    kwargs: dict[str, Any] = {
        "amount_micros": 15_000_000,
        "currency": "USD",
        "payment_method_ref": f"{CUSTOMER}/{PAYMENT_METHOD}",
        "idempotency_key": KEY,
    }
    kwargs.update(overrides)
    return asyncio.run(provider.charge(**kwargs))


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


# ---------------------------------------------------------------------- the request


def test_succeeded_charge_sends_an_off_session_payment_intent_with_our_idempotency_key():
    provider, http = provider_with((200, "payment_intent_succeeded.json"))

    result = charge(provider)

    assert result == ChargeResult(succeeded=True, charge_id="pi_3QxR2fLkdIwHu7ix0n5gT8aB", decline_code=None)
    [sent] = http.sent
    assert sent.method == "POST"
    assert sent.path == "/v1/payment_intents"
    assert sent.headers["Idempotency-Key"] == KEY
    assert sent.headers["Authorization"] == "Bearer sk_test_4eC39HqLyjWDarjtT1zdp7dc"
    assert sent.form["amount"] == "1500"  # 15 USD in cents
    assert sent.form["currency"] == "usd"
    assert sent.form["customer"] == CUSTOMER
    assert sent.form["payment_method"] == PAYMENT_METHOD
    assert sent.form["off_session"] == "true"
    assert sent.form["confirm"] == "true"
    assert sent.form["automatic_payment_methods[allow_redirects]"] == "never"
    assert sent.form["metadata[idempotency_key]"] == KEY


def test_a_repeated_call_sends_the_same_key_and_parameters_and_gets_the_first_answer():
    # Stripe replays the saved response of the first request with a key
    provider, http = provider_with(
        (200, "payment_intent_succeeded.json"), (200, "payment_intent_succeeded.json")
    )

    first = charge(provider)
    second = charge(provider)

    assert first == second
    assert [s.headers["Idempotency-Key"] for s in http.sent] == [KEY, KEY]
    assert http.sent[0].form == http.sent[1].form


def test_another_key_is_sent_as_is():
    provider, http = provider_with((200, "payment_intent_succeeded.json"))
    charge(provider, idempotency_key="top-up:other")
    assert http.sent[0].headers["Idempotency-Key"] == "top-up:other"
    assert http.sent[0].form["metadata[idempotency_key]"] == "top-up:other"


def test_a_payment_method_without_customer_sends_no_customer():
    provider, http = provider_with((200, "payment_intent_succeeded.json"))
    charge(provider, payment_method_ref=PAYMENT_METHOD)
    assert "customer" not in http.sent[0].form
    assert http.sent[0].form["payment_method"] == PAYMENT_METHOD


def test_amount_is_sent_in_the_currency_minor_unit():
    provider, http = provider_with(
        (200, "payment_intent_succeeded.json"),
        (200, "payment_intent_succeeded.json"),
        (200, "payment_intent_succeeded.json"),
    )
    charge(provider, amount_micros=500_000_000, currency="JPY")
    charge(provider, amount_micros=5_120_000, currency="kwd")
    charge(provider, amount_micros=12_340_000, currency="eur")
    assert [(s.form["amount"], s.form["currency"]) for s in http.sent] == [
        ("500", "jpy"),
        ("5120", "kwd"),
        ("1234", "eur"),
    ]


@pytest.mark.parametrize(
    "ref", ["", "pm_", "cus_123", "cus_123/", "cus_123/pm_1/x", "card_1QxR", "cus 1/pm_1", "pm_1 ", "PM_1"]
)
def test_a_malformed_payment_method_ref_is_rejected_before_any_request(ref: str):
    provider, http = provider_with()
    with pytest.raises(ProviderRejected, match="payment_method_ref"):
        charge(provider, payment_method_ref=ref)
    assert http.sent == []


def test_a_fractional_minor_unit_amount_is_rejected_before_any_request():
    provider, http = provider_with()
    with pytest.raises(ProviderRejected, match="not a whole number of minor units"):
        charge(provider, amount_micros=1_234_567)
    assert http.sent == []


# ---------------------------------------------------------------------- outcomes


def test_card_declined_is_a_declined_result_with_the_issuer_decline_code():
    provider, http = provider_with((402, "card_declined_402.json"))

    result = charge(provider)

    assert result == ChargeResult(
        succeeded=False, charge_id="pi_3QxT7mLkdIwHu7ix1aQ4bN2s", decline_code="insufficient_funds"
    )
    assert len(http.sent) == 1


def test_off_session_authentication_required_is_a_decline():
    provider, _ = provider_with((402, "authentication_required_402.json"))
    result = charge(provider)
    assert result == ChargeResult(
        succeeded=False, charge_id="pi_3QxU1pLkdIwHu7ix0Km5rB8e", decline_code="authentication_required"
    )


def test_a_card_error_without_decline_code_uses_the_error_code_and_charge_id():
    body = fixture("card_declined_402.json")
    del body["error"]["decline_code"], body["error"]["payment_intent"]
    body["error"]["code"] = "expired_card"
    error = stripe.CardError("Your card has expired.", None, "expired_card", json.dumps(body), 402, body)
    provider, _ = provider_with(error)
    result = charge(provider)
    assert result == ChargeResult(
        succeeded=False, charge_id="ch_3QxT7mLkdIwHu7ix1c8Hf0Lm", decline_code="expired_card"
    )


def test_requires_action_is_a_decline_for_authentication():
    provider, _ = provider_with((200, "payment_intent_requires_action.json"))
    result = charge(provider)
    assert result == ChargeResult(
        succeeded=False, charge_id="pi_3QxW8kLkdIwHu7ix0Fp3vG6n", decline_code="authentication_required"
    )


def test_requires_payment_method_is_a_decline_with_the_last_payment_error():
    intent = fixture("card_declined_402.json")["error"]["payment_intent"]
    assert intent["status"] == "requires_payment_method"
    result = StripePaymentProvider._result(stripe.PaymentIntent.construct_from(intent, "sk_test_x"))
    assert result == ChargeResult(
        succeeded=False, charge_id="pi_3QxT7mLkdIwHu7ix1aQ4bN2s", decline_code="insufficient_funds"
    )


def test_processing_still_processing_when_read_again_is_a_processing_result():
    provider, http = provider_with(
        (200, "payment_intent_processing.json"), (200, "payment_intent_processing.json")
    )

    result = charge(provider, amount_micros=2_500_000_000)

    # not an error to retry for days: the reconciler looks it up until it settles
    assert result == ChargeResult(succeeded=False, charge_id="pi_3QxV5hLkdIwHu7ix1Yt7mC4w", processing=True)
    assert result.state == "processing"
    assert [(s.method, s.path) for s in http.sent] == [
        ("POST", "/v1/payment_intents"),
        ("GET", "/v1/payment_intents/pi_3QxV5hLkdIwHu7ix1Yt7mC4w"),
    ]


# ---------------------------------------------------------------------- lookups (reconciliation)


def lookup(provider: StripePaymentProvider, charge_id: str | None = None) -> ChargeLookup:
    return asyncio.run(provider.lookup(idempotency_key=KEY, charge_id=charge_id))


def test_lookup_by_stored_id_reads_the_payment_intent():
    provider, http = provider_with((200, "payment_intent_processing_settled.json"))
    assert lookup(provider, "pi_3QxV5hLkdIwHu7ix1Yt7mC4w") == ChargeLookup(
        "succeeded", "pi_3QxV5hLkdIwHu7ix1Yt7mC4w"
    )
    assert [(s.method, s.path) for s in http.sent] == [
        ("GET", "/v1/payment_intents/pi_3QxV5hLkdIwHu7ix1Yt7mC4w")
    ]


def test_lookup_without_an_id_searches_our_metadata_key():
    provider, http = provider_with((200, "payment_intent_search_processing.json"))
    assert lookup(provider) == ChargeLookup("processing", "pi_3QxV5hLkdIwHu7ix1Yt7mC4w")
    (sent,) = http.sent
    assert (sent.method, sent.path) == ("GET", "/v1/payment_intents/search")


def test_lookup_that_finds_nothing_is_not_found():
    provider, _ = provider_with((200, "payment_intent_search_empty.json"))
    assert lookup(provider) == ChargeLookup("not_found")


def test_lookup_of_a_declined_intent_is_a_decline_with_its_code():
    provider, _ = provider_with((200, "payment_intent_requires_action.json"))
    found = lookup(provider, "pi_3QxR9kLkdIwHu7ix0q2Wd5Lm")
    assert found.state == "declined" and found.decline_code == "authentication_required"


def test_lookup_that_stripe_cannot_answer_is_transient():
    provider, _ = provider_with((500, "api_error_500.json"))
    with pytest.raises(ProviderError):
        lookup(provider)


def test_processing_that_has_settled_since_is_a_success():
    # the retry's create replays the saved "processing" answer; the PaymentIntent itself has settled
    provider, http = provider_with(
        (200, "payment_intent_processing.json"), (200, "payment_intent_processing_settled.json")
    )
    result = charge(provider, amount_micros=2_500_000_000)
    assert result == ChargeResult(succeeded=True, charge_id="pi_3QxV5hLkdIwHu7ix1Yt7mC4w")
    assert http.sent[0].form["amount"] == "250000"


# ---------------------------------------------------------------------- errors


def test_a_connection_failure_is_a_provider_timeout():
    failure = stripe.APIConnectionError(
        "Unexpected error communicating with Stripe.\n\n(Network error: ReadTimeout: read timed out)",
        should_retry=True,
    )
    provider, http = provider_with(failure)
    with pytest.raises(ProviderTimeout) as info:
        charge(provider)
    assert isinstance(info.value.__cause__, stripe.APIConnectionError)
    assert len(http.sent) == 1  # no retry inside the library: that is Dramatiq's


@pytest.mark.parametrize(
    ("status", "fixture_name", "stripe_error"),
    [(500, "api_error_500.json", stripe.APIError), (429, "rate_limit_429.json", stripe.RateLimitError)],
)
def test_server_errors_and_rate_limits_are_transient(status: int, fixture_name: str, stripe_error: type):
    provider, http = provider_with((status, fixture_name))
    with pytest.raises(ProviderError) as info:
        charge(provider)
    assert type(info.value) is ProviderError  # not a timeout, not permanent: retried with the same key
    assert isinstance(info.value.__cause__, stripe_error)
    assert f"HTTP {status}" in info.value.message
    assert len(http.sent) == 1


@pytest.mark.parametrize(
    ("status", "fixture_name", "stripe_error"),
    [
        (400, "invalid_request_400.json", stripe.InvalidRequestError),
        (401, "authentication_error_401.json", stripe.AuthenticationError),
        (400, "idempotency_error_400.json", stripe.IdempotencyError),
    ],
)
def test_rejected_requests_are_permanent(status: int, fixture_name: str, stripe_error: type):
    provider, _ = provider_with((status, fixture_name))
    with pytest.raises(ProviderRejected) as info:
        charge(provider)
    assert isinstance(info.value, PermanentError)
    assert info.value.code == "provider_rejected"
    assert isinstance(info.value.__cause__, stripe_error)
    assert "sk_test_4eC39HqLyjWDarjtT1zdp7dc" not in info.value.message


def test_a_permission_error_is_permanent():
    body = {
        "error": {
            "message": "The provided key does not have the required permissions.",
            "type": "invalid_request_error",
        }
    }
    provider, _ = provider_with(stripe.PermissionError(body["error"]["message"], json.dumps(body), 403, body))
    with pytest.raises(ProviderRejected):
        charge(provider)


def test_the_production_http_client_times_out_as_a_provider_timeout():
    provider = StripePaymentProvider(
        "sk_test_x", api_base="http://stripe-mock.invalid:12111", timeout_ms=1_500
    )
    with mock.patch.object(
        requests.Session,
        "request",
        autospec=True,
        side_effect=requests.exceptions.ReadTimeout("read timed out"),
    ) as sent:
        with pytest.raises(ProviderTimeout, match="ReadTimeout"):
            charge(provider)
    [call] = sent.call_args_list
    assert call.args[1:] == ("post", "http://stripe-mock.invalid:12111/v1/payment_intents")
    assert call.kwargs["timeout"] == 1.5  # stripe_timeout_ms, in seconds
    assert call.kwargs["headers"]["Idempotency-Key"] == KEY


def test_close_closes_the_http_client():
    provider, http = provider_with()
    asyncio.run(provider.close())
    assert http.closed


# ---------------------------------------------------------------------- money


@pytest.mark.parametrize(
    ("amount_micros", "currency", "minor"),
    [
        (1_500_000, "usd", 150),  # 1.50 USD: cents
        (10_000, "USD", 1),  # 0.01 USD
        (500_000_000, "jpy", 500),  # zero-decimal: whole yen
        (1_000_000, "KRW", 1),
        (5_120_000, "kwd", 5120),  # three-decimal: fils
        (1_000_000, "bhd", 1000),
        (40_000_000, "isk", 4000),  # ISK: two-decimal in the API, whole krona
    ],
)
def test_to_minor_units(amount_micros: int, currency: str, minor: int):
    assert to_minor_units(amount_micros, currency) == minor


@pytest.mark.parametrize(
    ("amount_micros", "currency", "match"),
    [
        (1_234_567, "usd", "not a whole number of minor units"),  # 123.4567 cents
        (1_005_000, "usd", "not a whole number of minor units"),  # 100.5 cents
        (1_500_000, "jpy", "not a whole number of minor units"),  # 1.5 yen
        (5_124_500, "kwd", "not a whole number of minor units"),  # 5124.5 fils
        (5_124_000, "kwd", "must end in 0"),  # Stripe: last digit of three-decimal amounts is 0
        (40_100_000, "isk", "whole units"),  # 40.10 ISK
        (0, "usd", "> 0"),
        (-1_000_000, "usd", "> 0"),
    ],
)
def test_to_minor_units_refuses_to_round(amount_micros: int, currency: str, match: str):
    with pytest.raises(ProviderRejected, match=match) as info:
        to_minor_units(amount_micros, currency)
    assert isinstance(info.value, PermanentError)  # not retried: the amount will not change


def test_minor_unit_exponents():
    assert [minor_unit_exponent(c) for c in ("usd", "EUR", "jpy", "VND", "xof", "kwd", "TND", "isk")] == [
        2,
        2,
        0,
        0,
        0,
        3,
        3,
        2,
    ]


def test_parse_payment_method_ref():
    assert parse_payment_method_ref("cus_RkT2x9QvLm3Ab1/pm_1QxR1aLkdIwHu7ixVb4Kc9Ze") == (
        "cus_RkT2x9QvLm3Ab1",
        "pm_1QxR1aLkdIwHu7ixVb4Kc9Ze",
    )
    assert parse_payment_method_ref("pm_card_visa") == (None, "pm_card_visa")


# ---------------------------------------------------------------------- configuration


@pytest.fixture
def no_billing_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "BILLING_PAYMENT_PROVIDER",
        "BILLING_STRIPE_API_KEY",
        "BILLING_STRIPE_API_BASE",
        "BILLING_STRIPE_TIMEOUT_MS",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("no_billing_env")
def test_make_provider_builds_stripe_from_settings():
    settings = Settings(
        payment_provider="stripe", stripe_api_key=SecretStr("sk_test_from_env"), stripe_timeout_ms=3_000
    )
    assert "sk_test_from_env" not in repr(settings)
    provider = make_provider(settings, engine=None)  # type: ignore[arg-type]  # stripe needs no database
    assert isinstance(provider, StripePaymentProvider)
    assert isinstance(provider.http_client, stripe.RequestsClient)


@pytest.mark.usefixtures("no_billing_env")
@pytest.mark.parametrize("key", [None, ""])
def test_make_provider_requires_a_stripe_api_key(key: str | None):
    settings = Settings(payment_provider="stripe", stripe_api_key=None if key is None else SecretStr(key))
    with pytest.raises(ConfigurationError, match="BILLING_STRIPE_API_KEY"):
        make_provider(settings, engine=None)  # type: ignore[arg-type]
