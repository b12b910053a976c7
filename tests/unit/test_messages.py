"""The message contract at the boundary (no services)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.errors import MessageValidationError
from tasks.messages import MAX_AMOUNT_MICROS, fingerprint, validate_message

TOP_UP = {"account_id": "a1", "idempotency_key": "k"}


@given(st.integers(min_value=1, max_value=MAX_AMOUNT_MICROS))
def test_any_amount_in_range_is_accepted(amount):
    assert validate_message("auto_top_up", {**TOP_UP, "amount_micros": amount}).amount_micros == amount


@given(
    st.one_of(
        st.integers(max_value=0),
        st.integers(min_value=MAX_AMOUNT_MICROS + 1),
        st.floats(allow_nan=True),
        st.booleans(),
        st.text(),
        st.decimals(allow_nan=False),
    )
)
def test_amounts_that_are_not_positive_integers_in_range_are_rejected(amount):
    with pytest.raises(MessageValidationError, match="amount_micros"):
        validate_message("auto_top_up", {**TOP_UP, "amount_micros": amount})


@given(st.text(min_size=1, max_size=255).filter(str.isprintable))
def test_printable_idempotency_keys_up_to_255_are_accepted(key):
    assert (
        validate_message("auto_top_up", {"account_id": "a1", "idempotency_key": key}).idempotency_key == key
    )


@pytest.mark.parametrize("key", ["", "x" * 256, "line\nbreak", "nul\x00", "bell\x07"])
def test_bad_idempotency_keys_are_rejected(key):
    with pytest.raises(MessageValidationError, match="idempotency_key"):
        validate_message("subscribe", {"account_id": "a", "plan_id": "p", "idempotency_key": key})


@pytest.mark.parametrize(
    "period_start",
    ["2026-01-31T00:00:00", "2026-01-31T00:00:00+01:00", "not a date", 1767139200, None],
)
def test_period_start_must_be_an_iso_utc_timestamp(period_start):
    with pytest.raises(MessageValidationError, match="period_start"):
        validate_message(
            "renew", {"subscription_id": "s", "period_start": period_start, "idempotency_key": "k"}
        )


def test_period_start_in_utc_is_parsed():
    msg = validate_message(
        "renew", {"subscription_id": "s", "period_start": "2026-01-31T00:00:00Z", "idempotency_key": "k"}
    )
    assert msg.period_start == datetime(2026, 1, 31, tzinfo=UTC)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reason": "r", "idempotency_key": "k"},
        {"key_id": "a", "subscription_id": "b", "reason": "r", "idempotency_key": "k"},
    ],
)
def test_revoke_key_needs_exactly_one_target(kwargs):
    with pytest.raises(MessageValidationError, match="exactly one"):
        validate_message("revoke_key", kwargs)


def test_unknown_actor_extra_fields_and_non_dict_payloads_are_rejected():
    with pytest.raises(MessageValidationError, match="unknown actor"):
        validate_message("refund_everything", {})
    with pytest.raises(MessageValidationError, match="unexpected field"):
        validate_message("subscribe", {"account_id": "a", "plan_id": "p", "idempotency_key": "k", "x": 1})
    with pytest.raises(MessageValidationError, match="keyword arguments"):
        validate_message("subscribe", ["a", "p", "k"])


@given(st.dictionaries(st.text(max_size=5), st.integers(), max_size=5))
def test_fingerprint_ignores_key_order(kwargs):
    reordered = dict(reversed(list(kwargs.items())))
    assert fingerprint("subscribe", kwargs) == fingerprint("subscribe", reordered)
    assert fingerprint("subscribe", kwargs) != fingerprint("renew", kwargs)


@settings(max_examples=300)
@given(
    subscription_id=st.text(
        alphabet=st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=40
    ),
    period_start=st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)
    ),
    retry=st.integers(0, 5),
)
def test_renewal_kwargs_are_exactly_the_renew_messages_kwargs(subscription_id, period_start, retry):
    from tasks.messages import RenewMessage, renewal_key, renewal_kwargs, validate_message

    expected = RenewMessage(
        subscription_id=subscription_id,
        period_start=period_start,
        idempotency_key=renewal_key(subscription_id, period_start, retry),
    ).kwargs()
    assert renewal_kwargs(subscription_id, period_start, retry) == expected
    assert (
        validate_message("renew", renewal_kwargs(subscription_id, period_start, retry)).kwargs() == expected
    )
