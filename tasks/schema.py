"""JSON Schema export of the message contract, for producers in other languages.

``python -m tasks.schema`` (or ``billing contract``) prints it; a copy lives
in ``docs/message-contract.schema.json``.
"""

from __future__ import annotations

import json
from typing import Any

from .messages import MAX_AMOUNT_MICROS, MESSAGE_MODELS

__all__ = ["contract_schema"]


def contract_schema() -> dict[str, Any]:
    """The contract: per actor, its queue and the JSON Schema of its keyword arguments."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "billing-queue message contract",
        "description": (
            "Dramatiq messages (default Redis namespace 'dramatiq', JSON encoding). Keyword arguments only; "
            f"money in integer micro-units (<= {MAX_AMOUNT_MICROS}); every message carries idempotency_key."
        ),
        "actors": {
            name: {"queue_name": model.queue_name, "kwargs": model.model_json_schema()}
            for name, model in MESSAGE_MODELS.items()
        },
    }


if __name__ == "__main__":
    print(json.dumps(contract_schema(), indent=2, sort_keys=True))
