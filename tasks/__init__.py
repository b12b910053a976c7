"""The message contract and the producer API of billing-queue."""

from .errors import BillingError, MessageValidationError, PermanentError, TransientError
from .messages import (
    BILLING_QUEUE,
    MAX_AMOUNT_MICROS,
    PAYMENTS_QUEUE,
    USAGE_QUEUE,
    AutoTopUpMessage,
    BillingMessage,
    RecordUsageMessage,
    RenewMessage,
    RevokeKeyMessage,
    SubscribeMessage,
    validate_message,
)
from .producer import Producer
from .schema import contract_schema

__all__ = [
    # messages
    "BillingMessage",
    "SubscribeMessage",
    "RenewMessage",
    "AutoTopUpMessage",
    "RevokeKeyMessage",
    "RecordUsageMessage",
    "validate_message",
    "BILLING_QUEUE",
    "PAYMENTS_QUEUE",
    "USAGE_QUEUE",
    "MAX_AMOUNT_MICROS",
    # producer
    "Producer",
    "contract_schema",
    # errors
    "BillingError",
    "PermanentError",
    "TransientError",
    "MessageValidationError",
]
