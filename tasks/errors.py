"""The one error hierarchy of billing-queue.

Every class's docstring doubles as its default message (procrastinate's
style).  Two branches decide the retry policy by type alone:

* :class:`PermanentError`: bad input or a state that will not change by
  itself (validation, unknown account or plan, idempotency conflict).  It is
  recorded for operators with its reason and never retried by Dramatiq.
* :class:`TransientError`: connection loss, deadlock, serialization failure,
  provider timeout.  Dramatiq retries it with exponential backoff.

Business outcomes such as insufficient funds are *results*, not errors.

The ``billing`` CLI exits with :attr:`BillingError.exit_code`: 2 for bad
input (every :class:`PermanentError`: a malformed option, an unknown id, an
idempotency conflict), 1 for a dependency that is down or misconfigured
(:class:`TransientError`, :class:`ConfigurationError`).
"""

from __future__ import annotations

__all__ = [
    "BillingError",
    "PermanentError",
    "TransientError",
    "MessageValidationError",
    "MessageAuthenticationFailed",
    "IdempotencyConflict",
    "UnknownAccount",
    "UnknownPlan",
    "UnknownSubscription",
    "UnknownApiKey",
    "CurrencyMismatch",
    "TooManyDeliveries",
    "DatabaseUnavailable",
    "ProviderError",
    "ProviderTimeout",
    "ProviderRejected",
    "ConfigurationError",
    "DatabaseMisconfigured",
    "BrokerUnavailable",
    "BrokerMisconfigured",
    "AlreadyReplayed",
]


class BillingError(Exception):
    """A billing operation failed."""

    #: The ``billing`` CLI's exit status for this error: 1 (a dependency is
    #: down or misconfigured) unless a subclass says otherwise.
    exit_code: int = 1

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or type(self).__name__).strip().splitlines()[0]
        super().__init__(self.message)

    @property
    def code(self) -> str:
        """A stable snake_case name of the error, for logs, results and operators."""
        name = type(self).__name__
        return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class PermanentError(BillingError):
    """The message can never succeed as sent; it is recorded and not retried."""

    #: Bad input: the CLI exits 2.
    exit_code = 2


class TransientError(BillingError):
    """A temporary failure; the message is retried with backoff."""


class ConfigurationError(BillingError):
    """The service is misconfigured."""


class DatabaseMisconfigured(ConfigurationError):
    """PostgreSQL refused the configured connection (no such database or role, a wrong password, no schema)."""


class BrokerUnavailable(TransientError):
    """Redis could not be reached."""


class BrokerMisconfigured(ConfigurationError):
    """Redis refused the configured connection (a bad URL or database number)."""


class MessageValidationError(PermanentError):
    """The message does not match its contract."""


class MessageAuthenticationFailed(PermanentError):
    """The message's signature is missing or does not verify (``BILLING_SIGNING_KEYS`` is set)."""


class IdempotencyConflict(PermanentError):
    """The idempotency key was used before with different arguments."""


class UnknownAccount(PermanentError):
    """No account has this id."""


class UnknownPlan(PermanentError):
    """No plan has this id."""


class UnknownSubscription(PermanentError):
    """No subscription has this id."""


class UnknownApiKey(PermanentError):
    """No API key has this id."""


class CurrencyMismatch(PermanentError):
    """The plan's currency differs from the account's currency."""


class TooManyDeliveries(PermanentError):
    """The message was delivered too many times without finishing (a poison message)."""


class DatabaseUnavailable(TransientError):
    """PostgreSQL could not complete the transaction (connection, deadlock or serialization)."""


class ProviderError(TransientError):
    """The payment provider failed; the call is retried with the same idempotency key."""


class ProviderTimeout(ProviderError):
    """The payment provider did not answer in time; the charge may or may not have happened."""


class ProviderRejected(PermanentError):
    """The payment provider cannot accept the charge as sent (request, credentials or amount); it is not retried."""


class AlreadyReplayed(PermanentError):
    """This failed message was replayed before; a failure is replayed once."""
