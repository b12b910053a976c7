"""``billing publish <kind>``: one command per message kind, generated from the contract.

For each model of :data:`tasks.messages.MESSAGE_MODELS` there is a command
named after its actor (``auto_top_up`` -> ``auto-top-up``) with one option
per field (``account_id`` -> ``--account-id``; integer fields take integers,
the others text), required when the field is, and the model's docstring as
its help.  The message is validated by the contract itself
(:func:`tasks.messages.validate_message`: a field that breaks it is bad
input, exit 2) and published with :class:`tasks.producer.Producer`; stdout
gets one JSON line: ``message_id``, ``actor``, ``idempotency_key``.

A new kind in the contract is a new command here, with nothing to write.
The two tables below hold what a generator cannot know: help texts, and a
field the command fills in when it is not given.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import click

from tasks.messages import MESSAGE_MODELS, BillingMessage, RenewMessage, renewal_key, validate_message

__all__ = ["publish_app", "publish_command"]


def _renewal_key(kwargs: dict[str, Any]) -> str:
    """The scheduler's key of the renewal the other options name."""
    parsed = validate_message(RenewMessage.actor_name, {**kwargs, "idempotency_key": "x"})
    assert isinstance(parsed, RenewMessage)
    return renewal_key(parsed.subscription_id, parsed.period_start)


#: (actor, field) -> help of its option.
OPTION_HELP: dict[tuple[str, str], str] = {
    (RenewMessage.actor_name, "period_start"): "ISO 8601 UTC, e.g. 2026-12-01T00:00:00Z.",
    (RenewMessage.actor_name, "idempotency_key"): (
        "Default: renew:{subscription_id}:{period_start}, the scheduler's key."
    ),
}

#: (actor, field) -> the value used when the option is not given, from the other fields' values.
DERIVED: dict[tuple[str, str], Callable[[dict[str, Any]], Any]] = {
    (RenewMessage.actor_name, "idempotency_key"): _renewal_key,
}


@click.group("publish")
def publish_app() -> None:
    """Publish a billing message (the producer API from a shell)."""


def _publish(actor_name: str, kwargs: dict[str, Any]) -> None:
    given = {k: v for k, v in kwargs.items() if v is not None}
    for (actor, field), derive in DERIVED.items():
        if actor == actor_name and field not in given:
            given[field] = derive(given)
    message = validate_message(actor_name, given)
    from tasks.producer import Producer

    message_id = Producer().publish(message)
    click.echo(
        json.dumps(
            {"message_id": message_id, "actor": actor_name, "idempotency_key": message.idempotency_key}
        )
    )


def _fields(model: type[BillingMessage]) -> list[str]:
    """The model's own fields first, then the inherited ones (``idempotency_key`` last)."""
    inherited = [name for name in BillingMessage.model_fields if name in model.model_fields]
    return [name for name in model.model_fields if name not in inherited] + inherited


def _is_integer(schema: dict[str, Any]) -> bool:
    types = [schema.get("type")] + [option.get("type") for option in schema.get("anyOf", ())]
    return "integer" in types


def publish_command(model: type[BillingMessage]) -> click.Command:
    """The ``billing publish`` command of one message model."""
    actor = model.actor_name
    properties = model.model_json_schema()["properties"]
    params: list[click.Parameter] = [
        click.Option(
            [f"--{name.replace('_', '-')}", name],
            type=int if _is_integer(properties[name]) else str,
            required=model.model_fields[name].is_required() and (actor, name) not in DERIVED,
            default=None,
            help=OPTION_HELP.get((actor, name)),
        )
        for name in _fields(model)
    ]

    def callback(**kwargs: Any) -> None:
        _publish(actor, kwargs)

    return click.Command(
        actor.replace("_", "-"),
        callback=callback,
        params=params,
        help=inspect.cleandoc(model.__doc__ or f"Publish ``{actor}``."),
    )


for _model in MESSAGE_MODELS.values():
    publish_app.add_command(publish_command(_model))
