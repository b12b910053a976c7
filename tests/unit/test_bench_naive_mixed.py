"""The naive mixed peer's messages: the mixed workload's, to the peer's actor of each kind (no services).

``bench.naive_mixed`` is read, not imported: importing it sets Dramatiq's
global broker to the stock one.
"""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from pathlib import Path

from bench import NAIVE_MIXED_ACTORS, NAIVE_MIXED_QUEUE
from bench.measure import _naive_mixed_message
from tasks.messages import AutoTopUpMessage, BillingMessage, RenewMessage, RevokeKeyMessage, SubscribeMessage

MODULE = Path(__file__).resolve().parents[2] / "bench" / "naive_mixed.py"


def _actor_parameters() -> dict[str, tuple[set[str], set[str]]]:
    """Each ``ACTORS[kind]`` actor of the module: (all its parameters, those without a default)."""
    out: dict[str, tuple[set[str], set[str]]] = {}
    for node in ast.parse(MODULE.read_text()).body:
        if not isinstance(node, ast.AsyncFunctionDef):
            continue
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and any(k.arg == "actor_name" for k in deco.keywords):
                name = next(k.value for k in deco.keywords if k.arg == "actor_name")
                assert isinstance(name, ast.Subscript) and isinstance(name.slice, ast.Constant)
                args = [a.arg for a in node.args.args]
                required = args[: len(args) - len(node.args.defaults)]
                out[str(name.slice.value)] = (set(args), set(required))
    return out


def test_every_kind_goes_to_its_naive_actor_with_the_arguments_it_takes() -> None:
    messages: list[BillingMessage] = [
        SubscribeMessage(account_id="bacct-1", plan_id="bench-naive-mix-1", idempotency_key="k1"),
        RenewMessage(
            subscription_id="bsub-2", period_start=datetime(2026, 1, 2, tzinfo=UTC), idempotency_key="k2"
        ),
        AutoTopUpMessage(
            account_id="bacct-3", amount_micros=10_000_000, reason="bench", idempotency_key="k3"
        ),
        RevokeKeyMessage(subscription_id="bsub-4", reason="bench", idempotency_key="k4"),
    ]
    params = _actor_parameters()
    assert set(params) == set(NAIVE_MIXED_ACTORS)
    for message in messages:
        sent = _naive_mixed_message(message)
        assert (sent.queue_name, sent.actor_name) == (
            NAIVE_MIXED_QUEUE,
            NAIVE_MIXED_ACTORS[message.actor_name],
        )
        names, required = params[message.actor_name]
        assert required <= set(sent.kwargs) <= names, message.actor_name
        assert sent.kwargs["idempotency_key"] == message.idempotency_key
    renew = _naive_mixed_message(messages[1])
    assert datetime.fromisoformat(renew.kwargs["period_start"]) == datetime(2026, 1, 2, tzinfo=UTC)
