"""StripePaymentProvider.list_charges (``billing reconcile``) against recorded list pages; no network."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import stripe

from tests.unit.test_stripe_provider import RecordedStripeHTTPClient
from workers.providers import ProviderCharge, StripePaymentProvider

SINCE = datetime(2026, 1, 1, tzinfo=UTC)
UNTIL = datetime(2026, 1, 2, 0, 0, 0, 500_000, tzinfo=UTC)


class QueryRecordingClient(RecordedStripeHTTPClient):
    """Also keeps each request's query string (a list is a GET)."""

    def __init__(self, *responses: Any) -> None:
        super().__init__(*responses)
        self.queries: list[dict[str, list[str]]] = []

    def request(self, method: str, url: str, headers: Any, post_data: Any = None, **kw: Any) -> Any:
        self.queries.append(parse_qs(urlsplit(url).query))
        return super().request(method, url, headers, post_data, **kw)


@pytest.fixture(autouse=True)
def _no_stripe_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stripe, "enable_telemetry", False)


def _list(*pages: str) -> tuple[list[ProviderCharge], QueryRecordingClient]:
    http = QueryRecordingClient(*((200, page) for page in pages))
    provider = StripePaymentProvider("sk_test_4eC39HqLyjWDarjtT1zdp7dc", http_client=http)
    return asyncio.run(provider.list_charges(since=SINCE, until=UNTIL)), http


def test_list_charges_pages_through_every_payment_intent_of_the_window():
    charges, http = _list("payment_intent_list_page1.json", "payment_intent_list_page2.json")

    assert [(s.method, s.path) for s in http.sent] == [("GET", "/v1/payment_intents")] * 2
    first, second = http.queries
    assert first["created[gte]"] == [str(int(SINCE.timestamp()))]
    # the window's end is exclusive, and a fraction of a second still counts
    assert first["created[lt]"] == [str(int(UNTIL.timestamp()) + 1)]
    assert first["limit"] == ["100"]
    assert "starting_after" not in first
    # auto-paging: the next page starts after the last PaymentIntent of the previous one
    assert second["starting_after"] == ["pi_3QyA1aLkdIwHu7ix0Aa1Aa1A"]
    assert [(c.charge_id, c.idempotency_key, c.amount_micros, c.currency, c.state) for c in charges] == [
        ("pi_3QyB2bLkdIwHu7ix0Bb2Bb2B", "billing-queue:top-up:tua_stripe_b", 15_000_000, "USD", "succeeded"),
        ("pi_3QyA1aLkdIwHu7ix0Aa1Aa1A", "billing-queue:top-up:tua_stripe_a", 20_000_000, "USD", "succeeded"),
        ("pi_3QyX9xLkdIwHu7ix0Xx9Xx9X", None, 9_990_000, "USD", "succeeded"),
        ("pi_3QyC3cLkdIwHu7ix0Cc3Cc3C", "billing-queue:top-up:tua_stripe_c", 30_000_000, "USD", "declined"),
    ]
    assert charges[0].created_at == datetime(2026, 1, 1, 1, 2, tzinfo=UTC)


def test_list_charges_that_stripe_cannot_answer_is_transient():
    from tasks.errors import ProviderError

    http = QueryRecordingClient((500, "api_error_500.json"))
    provider = StripePaymentProvider("sk_test_4eC39HqLyjWDarjtT1zdp7dc", http_client=http)
    with pytest.raises(ProviderError):
        asyncio.run(provider.list_charges(since=SINCE, until=UNTIL))
