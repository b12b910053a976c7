"""Sealed boxes of issued API keys: only the private key opens them, and they name their key."""

from __future__ import annotations

import base64

import pytest
from nacl.exceptions import CryptoError

from tasks.errors import ConfigurationError
from tasks.key_sealing import (
    canonical_public_key,
    generate_keypair,
    open_api_key,
    parse_private_key,
    parse_public_key,
    public_key_of,
    seal_api_key,
)

KEY = "bq_0123456789ab.secret-part-of-the-key-0123456789abcdefghijklmn"


def _seal(public: str, key_id: str = "key_1") -> bytes:
    return seal_api_key(
        public, key_id=key_id, account_id="a1", subscription_id="sub_1", prefix="bq_0123456789ab", api_key=KEY
    )


def test_a_sealed_key_opens_with_its_private_key_only():
    public, private = generate_keypair()
    other_public, other_private = generate_keypair()
    sealed = _seal(public)
    assert KEY.encode() not in sealed and b"secret-part" not in sealed
    opened = open_api_key(parse_private_key(private), sealed, expect_key_id="key_1")
    assert (opened.key_id, opened.account_id, opened.subscription_id, opened.api_key) == (
        "key_1",
        "a1",
        "sub_1",
        KEY,
    )
    assert KEY not in repr(opened)
    with pytest.raises(CryptoError):
        open_api_key(parse_private_key(other_private), sealed)
    assert public_key_of(parse_private_key(private)) == public != other_public


def test_two_seals_of_one_key_differ_and_a_tampered_box_does_not_open():
    public, private = generate_keypair()
    first, second = _seal(public), _seal(public)
    assert first != second  # an ephemeral key per box
    tampered = bytearray(first)
    tampered[-1] ^= 1
    with pytest.raises(CryptoError):
        open_api_key(parse_private_key(private), bytes(tampered))


def test_a_box_moved_to_another_delivery_row_is_detected():
    public, private = generate_keypair()
    with pytest.raises(ValueError, match="names key 'key_1'"):
        open_api_key(parse_private_key(private), _seal(public, "key_1"), expect_key_id="key_2")


@pytest.mark.parametrize(
    ("value", "message"),
    [("not base64!", "not valid base64"), (base64.b64encode(b"short").decode(), "must be 32 bytes")],
)
def test_a_malformed_key_is_one_clear_configuration_error(value, message):
    with pytest.raises(ConfigurationError, match=message):
        parse_public_key(value, "BILLING_KEY_DELIVERY_PUBLIC_KEY")
    with pytest.raises(ConfigurationError, match=message):
        parse_private_key(value)


def test_the_canonical_form_of_a_public_key_is_its_standard_base64():
    public, _ = generate_keypair()
    assert canonical_public_key(" " + public + "\n") == public
