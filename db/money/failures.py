"""Messages that failed for good, kept for operators with their secrets redacted (``failed_messages``)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from ..sql import statement

__all__ = ["SECRET_ARGUMENT", "record_failure", "redact"]

_RECORD_FAILURE = statement("record_failure", json_params=("kwargs",))


#: Argument names stored as ``[redacted]`` in ``failed_messages`` (case-insensitive, anywhere in the name).
SECRET_ARGUMENT = re.compile(
    r"secret|password|passwd|token|api_?key|authorization|card|cvc|cvv|iban|signature", re.I
)


def redact(value: Any) -> Any:
    """A copy of ``value`` (JSON-like) with every secret-looking key's value replaced by ``[redacted]``.

    Code points PostgreSQL cannot store in text or jsonb are escaped (see
    :func:`_no_nul`), and the numbers jsonb has no form for (``NaN``,
    ``Infinity``, which Python's JSON decoder accepts) are written as those
    words: a malformed message may carry either.
    """
    if isinstance(value, dict):
        return {
            _no_nul(str(k)): "[redacted]" if SECRET_ARGUMENT.search(str(k)) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _no_nul(value)
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)  # "NaN", "Infinity" or "-Infinity"
    return value


#: What PostgreSQL text and jsonb cannot hold: NUL, and UTF-16 surrogates
#: (a lone one decodes from JSON's ``"\\ud83c"``, which JavaScript writes for half an emoji).
_NOT_STORABLE = re.compile("[\x00\ud800-\udfff]")


def _no_nul(text: str) -> str:
    """``text`` with NUL written as the four characters ``\\x00`` and a surrogate as the six ``\\udXXX``."""
    return _NOT_STORABLE.sub(lambda m: "\\x00" if m.group() == "\x00" else f"\\u{ord(m.group()):04x}", text)


async def record_failure(
    conn: AsyncConnection,
    *,
    message_id: str,
    actor_name: str,
    queue_name: str,
    kwargs: Any,
    idempotency_key: str | None,
    account_id: str | None,
    error_type: str,
    error_message: str,
    traceback: str | None,
    attempts: int,
) -> None:
    """Record a message that failed for good, for operators (``failed_messages``).

    Arguments whose name suggests a secret (:data:`SECRET_ARGUMENT`) are
    stored as ``[redacted]``: the contract's messages carry none, but a
    malformed message may.  A failure recorded again (a retry that failed)
    updates its row, counts the attempt and sets it back to ``dead``.
    """
    await conn.execute(
        _RECORD_FAILURE,
        {
            "message_id": _no_nul(message_id),
            "actor_name": _no_nul(actor_name)[:255],
            "queue_name": _no_nul(queue_name)[:255],
            "kwargs": redact(kwargs),
            "idempotency_key": _no_nul(idempotency_key) if idempotency_key is not None else None,
            "account_id": _no_nul(account_id) if account_id is not None else None,
            "error_type": error_type,
            "error_message": _no_nul(error_message)[:4000],
            "traceback": _no_nul(traceback)[-8000:] if traceback else None,
            "attempts": attempts,
        },
    )
