"""Sealed boxes for the delivery of issued API keys (the consumer side of the contract).

An issued key's plaintext never rests anywhere in the clear.  The worker
seals a small JSON document (the key's ids and its plaintext) to the
subscriber's X25519 public key with a libsodium **sealed box**
(``crypto_box_seal``: an ephemeral key pair, X25519 + XSalsa20-Poly1305),
and stores only the ciphertext.  Only the holder of the matching private key
can open it; the worker itself cannot, once the ephemeral key is gone.

Keys travel as standard base64 of their 32 raw bytes (44 characters), the
form :func:`generate_keypair` prints and ``BILLING_KEY_DELIVERY_PUBLIC_KEY``
takes.  Any libsodium binding opens the box (``crypto_box_seal_open``).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from .errors import ConfigurationError

__all__ = [
    "SealedKey",
    "generate_keypair",
    "parse_public_key",
    "parse_private_key",
    "public_key_of",
    "seal_api_key",
    "open_api_key",
    "CryptoError",
]

#: The version of the sealed document's layout (``"v"`` in it).
SEALED_VERSION = 1


@dataclass(frozen=True)
class SealedKey:
    """An opened delivery: the ids it was sealed with and the key's plaintext.

    Attributes:
      key_id, account_id, subscription_id, prefix: As in ``api_keys`` (subscription_id None for none).
      api_key: The plaintext (``bq_…``); hand it over, never store or log it.
    """

    key_id: str
    account_id: str
    subscription_id: str | None
    prefix: str
    api_key: str = field(repr=False)


def _decode32(value: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigurationError(f"{what} is not valid base64") from exc
    if len(raw) != 32:
        raise ConfigurationError(f"{what} must be 32 bytes in base64 (44 characters), got {len(raw)} bytes")
    return raw


def parse_public_key(value: str, what: str = "the key delivery public key") -> PublicKey:
    """A base64 X25519 public key.

    Raises:
      ConfigurationError: Not base64 of exactly 32 bytes.
    """
    return PublicKey(_decode32(value, what))


def parse_private_key(value: str, what: str = "the key delivery private key") -> PrivateKey:
    """A base64 X25519 private key.

    Raises:
      ConfigurationError: Not base64 of exactly 32 bytes.
    """
    return PrivateKey(_decode32(value, what))


def public_key_of(private_key: PrivateKey) -> str:
    """The base64 public key of ``private_key`` (what the deliveries sealed to it name as recipient)."""
    return base64.b64encode(bytes(private_key.public_key)).decode()


def generate_keypair() -> tuple[str, str]:
    """A new X25519 key pair as ``(public_b64, private_b64)``."""
    private = PrivateKey.generate()
    return public_key_of(private), base64.b64encode(bytes(private)).decode()


def canonical_public_key(value: str) -> str:
    """``value`` re-encoded in canonical base64 (the form stored as the delivery's recipient).

    Raises:
      ConfigurationError: Not base64 of exactly 32 bytes.
    """
    return base64.b64encode(bytes(parse_public_key(value))).decode()


def seal_api_key(
    public_key: str,
    *,
    key_id: str,
    account_id: str,
    subscription_id: str | None,
    prefix: str,
    api_key: str,
) -> bytes:
    """Seal an issued key to ``public_key`` (base64). Returns the ciphertext (48 bytes + the document).

    The document binds the plaintext to its ids, so a ciphertext moved to
    another delivery row is detected when it is opened (:func:`open_api_key`).

    Raises:
      ConfigurationError: ``public_key`` is not base64 of 32 bytes.
    """
    document = json.dumps(
        {
            "v": SEALED_VERSION,
            "key_id": key_id,
            "account_id": account_id,
            "subscription_id": subscription_id,
            "prefix": prefix,
            "api_key": api_key,
        },
        separators=(",", ":"),
        sort_keys=True,
    )
    return bytes(SealedBox(parse_public_key(public_key)).encrypt(document.encode()))


def open_api_key(
    private_key: PrivateKey, ciphertext: bytes, *, expect_key_id: str | None = None
) -> SealedKey:
    """Open a sealed delivery with the recipient's private key.

    Parameters:
      expect_key_id: The delivery row's ``key_id``; the sealed document must name the same key.

    Raises:
      nacl.exceptions.CryptoError: Not sealed to this key, or tampered with.
      ValueError: The document is not a sealed key, or names another key than ``expect_key_id``.
    """
    document: dict[str, Any] = json.loads(SealedBox(private_key).decrypt(bytes(ciphertext)))
    if document.get("v") != SEALED_VERSION:
        raise ValueError(f"unknown sealed key version {document.get('v')!r}")
    opened = SealedKey(
        key_id=str(document["key_id"]),
        account_id=str(document["account_id"]),
        subscription_id=document.get("subscription_id"),
        prefix=str(document["prefix"]),
        api_key=str(document["api_key"]),
    )
    if expect_key_id is not None and opened.key_id != expect_key_id:
        raise ValueError(f"the sealed document names key {opened.key_id!r}, the delivery {expect_key_id!r}")
    return opened
