"""Message authentication: HMAC-SHA256 signatures on billing messages, with key rotation.

Anyone who can write to Redis can enqueue a Dramatiq message.  With
``BILLING_SIGNING_KEYS`` set, producers sign every message and workers
reject, record and never apply one that is unsigned, signed with an
unknown key, forged, tampered with, or replayed under another actor or
message id.

The signature covers a canonical form of what a message *does*::

    canonical = JSON of [actor_name, message_id, kwargs]
                with keys sorted, separators "," and ":", UTF-8, no ASCII escaping
    signature = "v1:" + key_id + ":" + hex(HMAC-SHA256(secret, canonical))

and travels in the Dramatiq message's ``options`` as ``billing_signature``
(options are part of Dramatiq's JSON message format, so any language can set
them; docs/contract.md shows how).  The queue is not signed: the contract fixes
each actor's queue, and a worker only runs an actor from its own queue.

Keys (RFC 2104 HMAC; rotation as in Stripe's webhook secrets):
``BILLING_SIGNING_KEYS`` is a JSON object of key id -> secret (at least 32
characters each), and ``BILLING_SIGNING_KEY_ID`` names the one producers sign
with (default: the only key).  To rotate: add the new key everywhere,
switch ``BILLING_SIGNING_KEY_ID`` on the producers, and remove the old key
once no message signed with it can still be in a queue.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from .errors import ConfigurationError

__all__ = [
    "SIGNATURE_OPTION",
    "SigningKeys",
    "canonical_form",
    "signing_keys_from_env",
    "SigningMiddleware",
    "forwarding",
]

#: The Dramatiq message option that carries the signature.
SIGNATURE_OPTION = "billing_signature"
#: Shortest secret accepted (characters).
MIN_SECRET_LENGTH = 32


#: The canonical JSON encoder (built once: ``json.dumps`` with options builds one per call).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_form(actor_name: str, message_id: str, kwargs: Any) -> bytes:
    """The bytes a signature covers: ``[actor_name, message_id, kwargs]`` as canonical JSON (UTF-8).

    Exactly ``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False)``.

    Raises:
      TypeError: ``kwargs`` holds a value JSON has no form for.
      ValueError: A lone surrogate, which UTF-8 cannot encode (``UnicodeEncodeError``).
    """
    return _CANONICAL.encode([actor_name, message_id, kwargs]).encode()


@dataclass(frozen=True)
class SigningKeys:
    """The keys that verify signatures, and the one that signs.

    Attributes:
      secrets: Key id -> secret.
      signing_key_id: The key new signatures use.
    """

    secrets: dict[str, str] = field(repr=False)
    signing_key_id: str

    def __post_init__(self) -> None:
        if not self.secrets:
            raise ConfigurationError("BILLING_SIGNING_KEYS holds no key")
        for key_id, secret in self.secrets.items():
            if not key_id or ":" in key_id or not key_id.isprintable():
                raise ConfigurationError(f"signing key id {key_id!r}: printable, without ':'")
            if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
                raise ConfigurationError(
                    f"signing key {key_id!r}: the secret needs {MIN_SECRET_LENGTH} characters at least"
                )
        if self.signing_key_id not in self.secrets:
            raise ConfigurationError(
                f"BILLING_SIGNING_KEY_ID {self.signing_key_id!r} is not in BILLING_SIGNING_KEYS"
            )

    def sign(self, actor_name: str, message_id: str, kwargs: Any) -> str:
        """The signature (``v1:{key_id}:{hex}``) of a message."""
        digest = hmac.new(
            self.secrets[self.signing_key_id].encode(),
            canonical_form(actor_name, message_id, kwargs),
            hashlib.sha256,
        ).hexdigest()
        return f"v1:{self.signing_key_id}:{digest}"

    def verify(self, actor_name: str, message_id: str, kwargs: Any, signature: Any) -> str | None:
        """None when ``signature`` is valid for the message, else why it is not (for the failure record).

        Constant-time comparison (``hmac.compare_digest``); any known key verifies (rotation).
        """
        if signature is None:
            return "the message is not signed"
        if not isinstance(signature, str) or signature.count(":") != 2:
            return "the signature is malformed"
        version, key_id, digest = signature.split(":")
        if version != "v1":
            return f"unknown signature version {version[:20]!r}"
        secret = self.secrets.get(key_id)
        if secret is None:
            return f"unknown signing key {key_id[:50]!r}"
        try:
            canonical = canonical_form(actor_name, message_id, kwargs)
        except (TypeError, ValueError):
            return "the arguments cannot be put in canonical form"
        expected = hmac.new(secret.encode(), canonical, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, digest):
            return "the signature does not match the message (forged, tampered with, or another actor or message id)"
        return None


def signing_keys_from_env(environ: dict[str, str] | None = None) -> SigningKeys | None:
    """Keys from ``BILLING_SIGNING_KEYS`` (JSON object) and ``BILLING_SIGNING_KEY_ID``; None when unset.

    This is the producer's own configuration: :mod:`tasks` imports nothing of
    the workers, so a producer reads its keys here (from ``environ``, default
    ``os.environ``).  The workers read the same two variables through their
    settings (``workers.settings.Settings.message_signing_keys``), which
    parse them with this function.

    Raises:
      ConfigurationError: Not a JSON object of strings, a short secret, or an unknown signing key id.
    """
    env = os.environ if environ is None else environ
    raw = env.get("BILLING_SIGNING_KEYS", "").strip()
    if not raw:
        return None
    try:
        secrets = json.loads(raw)
    except ValueError as exc:
        raise ConfigurationError(
            'BILLING_SIGNING_KEYS must be a JSON object: {"key-id": "secret", ...}'
        ) from exc
    if not isinstance(secrets, dict):
        raise ConfigurationError('BILLING_SIGNING_KEYS must be a JSON object: {"key-id": "secret", ...}')
    key_id = env.get("BILLING_SIGNING_KEY_ID", "").strip()
    if not key_id:
        if len(secrets) != 1:
            raise ConfigurationError(
                "BILLING_SIGNING_KEY_ID must name the signing key when there are several"
            )
        key_id = next(iter(secrets))
    return SigningKeys(secrets=secrets, signing_key_id=key_id)


#: True while this thread (or task) re-enqueues a message it fetched from Redis (see :func:`forwarding`).
_FORWARDING: ContextVar[bool] = ContextVar("billing_signing_forwarding", default=False)


@contextmanager
def forwarding() -> Iterator[None]:
    """Within this block, :class:`SigningMiddleware` signs nothing: messages keep the signature they carry.

    For enqueues that move a message somebody else created: Dramatiq's worker
    moving a delayed message from ``billing.DQ`` to ``billing``, its Retries
    middleware re-enqueueing a failed one, an operator retrying a dead-lettered
    copy.  :class:`workers.broker.BillingRedisBroker` enters it for every
    message that came from Redis (it carries ``options.redis_message_id``).
    """
    token = _FORWARDING.set(True)
    try:
        yield
    finally:
        _FORWARDING.reset(token)


class SigningMiddleware(Middleware):
    """Signs every message a process *creates* (``before_enqueue``), so no enqueue path can forget to.

    Producers, the outbox relay, the scheduler and operator retries from
    PostgreSQL all enqueue new messages through a broker carrying this
    middleware.  A message that only moves (from a delay queue to its queue,
    a Dramatiq retry, a dead-lettered copy sent back) is enqueued under
    :func:`forwarding` and keeps its original signature, which the worker
    verifies again: a worker never signs what somebody wrote into Redis.
    """

    def __init__(self, keys: SigningKeys) -> None:
        self.keys = keys

    def before_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None
    ) -> None:
        """Add (or replace) the signature in ``message.options``; leave it as it is while :func:`forwarding`."""
        if _FORWARDING.get():
            return
        message.options[SIGNATURE_OPTION] = self.keys.sign(
            message.actor_name, message.message_id, message.kwargs
        )
