"""The lengths in the message contract count Unicode code points, not UTF-16 code units or bytes.

A JavaScript producer's ``s.length`` counts an emoji outside the BMP as 2;
the worker counts it as 1 (docs/contract.md).
"""

from __future__ import annotations

import pytest

from tasks.errors import MessageValidationError
from tasks.messages import validate_message

EMOJI = "\U0001f600"  # one code point, two UTF-16 code units, four UTF-8 bytes


def test_an_idempotency_key_of_255_code_points_is_accepted_whatever_its_utf16_length():
    key = EMOJI * 255
    assert len(key.encode("utf-16-le")) // 2 == 510
    message = validate_message("subscribe", {"account_id": "a1", "plan_id": "pro", "idempotency_key": key})
    assert message.idempotency_key == key
    with pytest.raises(MessageValidationError, match="idempotency_key"):
        validate_message("subscribe", {"account_id": "a1", "plan_id": "pro", "idempotency_key": key + EMOJI})


def test_an_id_of_255_code_points_is_accepted():
    validate_message("subscribe", {"account_id": EMOJI * 255, "plan_id": "pro", "idempotency_key": "k"})
    with pytest.raises(MessageValidationError, match="account_id"):
        validate_message("subscribe", {"account_id": EMOJI * 256, "plan_id": "pro", "idempotency_key": "k"})


def test_a_reason_of_500_code_points_is_accepted():
    kwargs = {"account_id": "a1", "idempotency_key": "k"}
    validate_message("auto_top_up", {**kwargs, "reason": EMOJI * 500})
    with pytest.raises(MessageValidationError, match="reason"):
        validate_message("auto_top_up", {**kwargs, "reason": EMOJI * 501})
