"""BILLING_BROKER_URL chooses the broker; the envelope check requires the Redis id on Redis only."""

from __future__ import annotations

import json

import pytest
from dramatiq.errors import DecodeError

from tasks.errors import ConfigurationError
from workers.broker import EnvelopeCheckingEncoder, make_broker
from workers.settings import Settings

ENVELOPE = {
    "queue_name": "billing",
    "actor_name": "subscribe",
    "args": [],
    "kwargs": {},
    "options": {},
    "message_id": "m1",
}


def test_the_broker_url_chooses_the_broker(monkeypatch):
    for name in ("BILLING_BROKER_URL", "BILLING_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    rabbit = Settings(broker_url="amqp://u:p@mq:5672/billing")
    assert rabbit.broker_kind() == "rabbitmq" and rabbit.message_broker_url() == "amqp://u:p@mq:5672/billing"
    assert rabbit.redis_url is None
    assert Settings(broker_url="amqps://u:p@mq:5671/billing").broker_kind() == "rabbitmq"
    # a Redis URL in BILLING_BROKER_URL is BILLING_REDIS_URL too; BILLING_REDIS_URL alone stays Redis
    redis_by_broker = Settings(broker_url="redis://r:6379/0")
    assert redis_by_broker.broker_kind() == "redis" and redis_by_broker.redis_url == "redis://r:6379/0"
    legacy = Settings(redis_url="redis://r:6379/3")
    assert legacy.broker_kind() == "redis" and legacy.message_broker_url() == "redis://r:6379/3"
    assert Settings().message_broker_url() is None and Settings().broker_kind() == "redis"


def test_a_bad_broker_url_is_one_clear_line(monkeypatch):
    for name in ("BILLING_BROKER_URL", "BILLING_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BILLING_BROKER_URL", "kafka://k:9092")
    with pytest.raises(ConfigurationError) as raised:
        Settings.checked()
    assert "\n" not in raised.value.message
    assert raised.value.message.startswith("BILLING_BROKER_URL must be an amqp:// or amqps:// URL")
    assert "'kafka'" in raised.value.message
    monkeypatch.setenv("BILLING_BROKER_URL", "redis://r:6379/x")
    with pytest.raises(ConfigurationError, match="BILLING_BROKER_URL: the database must be a number"):
        Settings.checked()
    monkeypatch.setenv("BILLING_BROKER_URL", "redis://a:6379/0")
    monkeypatch.setenv("BILLING_REDIS_URL", "redis://b:6379/0")
    with pytest.raises(ConfigurationError, match="two different Redis URLs"):
        Settings.checked()
    monkeypatch.delenv("BILLING_BROKER_URL")
    monkeypatch.delenv("BILLING_REDIS_URL")
    with pytest.raises(ConfigurationError, match="unknown scheme 'kafka'"):
        make_broker(Settings(), url="kafka://k:9092")


def test_the_envelope_check_requires_the_redis_id_on_redis_only():
    body = json.dumps(ENVELOPE).encode()
    with pytest.raises(DecodeError, match="Redis message id"):
        EnvelopeCheckingEncoder().decode(body)
    assert EnvelopeCheckingEncoder(require_redis_id=False).decode(body)["message_id"] == "m1"
    with_id = json.dumps({**ENVELOPE, "options": {"redis_message_id": "r1"}}).encode()
    assert EnvelopeCheckingEncoder().decode(with_id)["options"] == {"redis_message_id": "r1"}
    # everything else is checked on both brokers
    for encoder in (EnvelopeCheckingEncoder(), EnvelopeCheckingEncoder(require_redis_id=False)):
        with pytest.raises(DecodeError, match="kwargs"):
            encoder.decode(json.dumps({**ENVELOPE, "kwargs": []}).encode())
