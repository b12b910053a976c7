"""``billing publish <kind>`` is generated from the contract's registry of kinds, one option per field."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from tasks.messages import MESSAGE_MODELS, BillingMessage
from workers.cli.publish import publish_app, publish_command


def test_every_kind_of_the_registry_has_a_publish_command_with_one_option_per_field():
    assert sorted(publish_app.commands) == sorted(name.replace("_", "-") for name in MESSAGE_MODELS)
    for actor, model in MESSAGE_MODELS.items():
        command = publish_app.commands[actor.replace("_", "-")]
        options = {p.name: p for p in command.params if isinstance(p, click.Option)}
        assert set(options) == set(model.model_fields), actor
        assert options["idempotency_key"].opts == ["--idempotency-key"]


def test_a_fifth_kind_gets_its_command_without_code():
    class RefundMessage(BillingMessage):
        """Refund ``amount_micros`` to ``account_id``."""

        actor_name = "refund"
        queue_name = "billing"

        account_id: str
        amount_micros: int

    command = publish_command(RefundMessage)
    assert command.name == "refund"
    assert command.help == "Refund ``amount_micros`` to ``account_id``."
    options = {p.name: p for p in command.params}
    assert options["amount_micros"].type is click.INT and options["amount_micros"].required
    assert options["account_id"].opts == ["--account-id"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["auto-top-up", "--account-id", "a", "--idempotency-key", "k", "--amount-micros", "1.5"], "integer"),
        (["renew", "--subscription-id", "s", "--period-start", "tomorrow"], "period_start"),
        (["revoke-key", "--reason", "r", "--idempotency-key", "k"], "exactly one of key_id"),
        (["subscribe", "--account-id", "a b", "--plan-id", "p", "--idempotency-key", "k"], "whitespace"),
    ],
)
def test_the_contract_validates_before_anything_is_published(args, needle):
    result = CliRunner().invoke(publish_app, args)
    assert result.exit_code != 0
    assert needle in (result.output + repr(result.exception))
