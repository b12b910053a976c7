"""StripePaymentProvider: charges a saved payment method through Stripe's PaymentIntents API.

One charge is one *off-session* PaymentIntent, created and confirmed in a
single ``POST /v1/payment_intents`` (Stripe docs, "Save and reuse payment
methods" / "Charge the saved payment method later"): the customer is not
present, so a card that needs authentication (SCA) is declined with
``authentication_required`` instead of waiting for the customer.

Our idempotency key is sent as Stripe's ``Idempotency-Key`` header (Stripe
docs, "Idempotent requests"): Stripe saves the status code and body of the
first request with a key and, for 24 hours, answers a repeat with the same
key with that saved response instead of charging again.  That also means a
repeat *replays* a saved error (including a 500) instead of trying again.

``payment_method_ref``, the account's opaque reference to its payment
method, has one of two forms for Stripe:

=========================== ================================================
``cus_XXX/pm_YYY``          PaymentMethod ``pm_YYY`` attached to Customer
                            ``cus_XXX`` (the usual form for a saved card)
``pm_YYY``                  a PaymentMethod not attached to a customer
=========================== ================================================

Outcomes and errors (the retry policy reads off the error type, see
:mod:`tasks.errors`):

=================================================== ==========================================
Stripe answer                                       result
=================================================== ==========================================
PaymentIntent ``succeeded``                         ``ChargeResult(succeeded=True)``
``CardError`` (402: declined, ``authentication_``   ``ChargeResult(succeeded=False,
``required``...)                                    decline_code=...)``
PaymentIntent ``requires_payment_method`` /         ``ChargeResult(succeeded=False,
``requires_action``                                 decline_code=...)``
PaymentIntent ``processing`` (still so when read    ``ChargeResult(processing=True)``: the
again by id)                                        reconciler looks it up until it settles
``APIConnectionError`` (network, timeout)           ``ProviderTimeout`` (retried, same key)
``RateLimitError`` (429), ``APIError`` (5xx, 409)   ``ProviderError`` (retried, same key)
``AuthenticationError`` (401), ``PermissionError``  ``ProviderRejected`` (not retried)
(403), ``InvalidRequestError`` (400/404),
``IdempotencyError``; any other PaymentIntent
status; an amount or reference Stripe cannot take
=================================================== ==========================================
"""

from __future__ import annotations

import asyncio
import math
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import stripe

from tasks.errors import BillingError, ProviderError, ProviderRejected, ProviderTimeout

from .base import ChargeLookup, ChargeResult, PaymentProvider, ProviderCharge

if TYPE_CHECKING:
    from stripe.params import PaymentIntentCreateParams

__all__ = [
    "StripePaymentProvider",
    "ZERO_DECIMAL_CURRENCIES",
    "THREE_DECIMAL_CURRENCIES",
    "minor_unit_exponent",
    "to_minor_units",
    "from_minor_units",
    "parse_payment_method_ref",
]

MICROS_PER_UNIT = 1_000_000

#: Stripe docs, "Supported currencies" / "Zero-decimal currencies": the API
#: amount is in whole units (500 means 500 JPY).
ZERO_DECIMAL_CURRENCIES = frozenset(
    {
        "bif",
        "clp",
        "djf",
        "gnf",
        "jpy",
        "kmf",
        "krw",
        "mga",
        "pyg",
        "rwf",
        "ugx",
        "vnd",
        "vuv",
        "xaf",
        "xof",
        "xpf",
    }
)

#: Stripe docs, "Supported currencies" / "Three-decimal currencies": the API
#: amount is in thousandths, and Stripe's partners require its last digit to
#: be 0 (5.124 KWD cannot be charged; 5.120 KWD can).
THREE_DECIMAL_CURRENCIES = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})

#: Stripe docs, "Supported currencies" / "Special cases": ISK stays two-decimal
#: in the API, but since April 2023 card networks accept whole krona only, so
#: the amount must be a multiple of 100.
_WHOLE_UNITS_ONLY = frozenset({"isk"})

#: Form of ``payment_method_ref``: ``cus_XXX/pm_YYY`` or ``pm_YYY``.  Stripe
#: ids are letters, digits and underscores after their prefix (test-mode
#: PaymentMethods such as ``pm_card_visa`` have underscores).
_PAYMENT_METHOD_REF = re.compile(r"(?:(?P<customer>cus_\w+)/)?(?P<payment_method>pm_\w+)", re.ASCII)

#: Network retries inside the Stripe library per call.  Zero: retrying is
#: Dramatiq's job (with backoff, same key), and one call stays bounded by one
#: ``timeout_ms``.
DEFAULT_MAX_NETWORK_RETRIES = 0


def minor_unit_exponent(currency: str) -> int:
    """Decimal places of ``currency``'s minor unit in Stripe's API (0, 2 or 3).

    Parameters:
      currency: ISO 4217 code, any case (``usd``, ``JPY``).

    Returns:
      int: 0 for Stripe's zero-decimal currencies, 3 for its three-decimal
      currencies, 2 for every other currency (Stripe docs, "Supported
      currencies").
    """
    code = currency.lower()
    if code in ZERO_DECIMAL_CURRENCIES:
        return 0
    if code in THREE_DECIMAL_CURRENCIES:
        return 3
    return 2


def to_minor_units(amount_micros: int, currency: str) -> int:
    """Convert micro-units to the integer ``amount`` Stripe expects (the currency's minor unit).

    USD: 1_500_000 micros (1.50 USD) -> 150 (cents); JPY: 500_000_000 micros
    -> 500 (yen); KWD: 5_120_000 micros (5.120 KWD) -> 5120 (fils).

    Parameters:
      amount_micros: Amount in micro-units of ``currency`` (1 unit = 1_000_000), > 0.
      currency: ISO 4217 code, any case.

    Returns:
      int: The amount in minor units, exactly (never rounded).

    Raises:
      ProviderRejected: The amount is not positive, is not a whole number of
        minor units (e.g. 1_234_567 micros of USD is 123.4567 cents), or breaks
        Stripe's rule for the currency (three-decimal amounts must end in 0,
        ISK amounts must be whole krona).  Rounding would charge a different
        amount than the one recorded in our ledger, so it is refused.  The
        error is a :class:`~tasks.errors.PermanentError`: the same amount
        would fail the same way on every retry (``ProviderError`` and
        ``ConfigurationError`` would be retried), so it is recorded for
        operators at once.
    """
    if amount_micros <= 0:
        raise ProviderRejected(f"stripe: amount must be > 0 micros, got {amount_micros}")
    code = currency.lower()
    micros_per_minor = MICROS_PER_UNIT // 10 ** minor_unit_exponent(code)
    minor, remainder = divmod(amount_micros, micros_per_minor)
    if remainder:
        raise ProviderRejected(
            f"stripe: {amount_micros} micros of {code.upper()} is not a whole number of minor units "
            f"(1 minor unit = {micros_per_minor} micros); refusing to round"
        )
    if code in THREE_DECIMAL_CURRENCIES and minor % 10:
        raise ProviderRejected(
            f"stripe: {code.upper()} amounts must end in 0 in minor units (Stripe rule for "
            f"three-decimal currencies), got {minor}"
        )
    if code in _WHOLE_UNITS_ONLY and minor % 100:
        raise ProviderRejected(f"stripe: {code.upper()} amounts must be whole units, got {minor} minor units")
    return minor


def from_minor_units(amount: int, currency: str) -> int:
    """The inverse of :func:`to_minor_units`: Stripe's integer ``amount`` in micro-units of ``currency``."""
    return amount * (MICROS_PER_UNIT // 10 ** minor_unit_exponent(currency.lower()))


def parse_payment_method_ref(payment_method_ref: str) -> tuple[str | None, str]:
    """Split ``payment_method_ref`` into Stripe's customer and PaymentMethod ids.

    Parameters:
      payment_method_ref: ``"cus_XXX/pm_YYY"`` (a PaymentMethod attached to a
        Customer) or ``"pm_YYY"`` (no customer).

    Returns:
      tuple: ``(customer_id or None, payment_method_id)``.

    Raises:
      ProviderRejected: The reference has neither form (not retried: the
        stored reference will not change by itself).
    """
    match = _PAYMENT_METHOD_REF.fullmatch(payment_method_ref)
    if match is None:
        raise ProviderRejected(
            f"stripe: payment_method_ref {payment_method_ref!r} is not 'cus_XXX/pm_YYY' or 'pm_YYY'"
        )
    return match["customer"], match["payment_method"]


def _field(obj: Any, name: str) -> Any:
    """``obj[name]``, or None when ``obj`` is None or lacks the field (StripeObject is not a dict)."""
    if obj is None or name not in obj:
        return None
    return obj[name]


def _describe(exc: stripe.StripeError) -> str:
    parts = [f"HTTP {exc.http_status}"] if exc.http_status else []
    if exc.code:
        parts.append(f"code {exc.code}")
    if exc.request_id:
        parts.append(f"request {exc.request_id}")
    detail = f" ({', '.join(parts)})" if parts else ""
    return f"stripe {type(exc).__name__}{detail}: {exc.user_message or 'no message'}"


def _translate(exc: stripe.StripeError) -> BillingError:
    """The billing error for a Stripe error other than ``CardError`` (see the module's table)."""
    if isinstance(exc, stripe.APIConnectionError):
        return ProviderTimeout(_describe(exc))
    if isinstance(
        exc,
        stripe.AuthenticationError
        | stripe.PermissionError
        | stripe.InvalidRequestError
        | stripe.IdempotencyError,
    ):
        return ProviderRejected(_describe(exc))
    # RateLimitError, APIError (5xx, 409 conflict, unreadable body) and anything new
    return ProviderError(_describe(exc))


def _lookup_of(intent: Any) -> ChargeLookup:
    """A PaymentIntent's state for reconciliation (see :meth:`StripePaymentProvider.lookup`)."""
    status = intent.status
    last_error = _field(intent, "last_payment_error")
    code = _field(last_error, "decline_code") or _field(last_error, "code")
    if status == "succeeded":
        return ChargeLookup("succeeded", intent.id)
    if status == "processing":
        return ChargeLookup("processing", intent.id)
    if status == "requires_payment_method":
        return ChargeLookup("declined", intent.id, code or "card_declined")
    if status == "requires_action":
        return ChargeLookup("declined", intent.id, code or "authentication_required")
    return ChargeLookup("failed", intent.id, code or f"payment_intent_{status}")


def _declined(intent_id: str | None, payment_error: Any, default_code: str) -> ChargeResult:
    decline_code = _field(payment_error, "decline_code") or _field(payment_error, "code") or default_code
    return ChargeResult(succeeded=False, charge_id=intent_id, decline_code=decline_code)


class StripePaymentProvider(PaymentProvider):
    """A payment provider that charges through Stripe (stripe-python 16, ``StripeClient``).

    The library is synchronous here (its async variant needs httpx or aiohttp,
    which the project does not install); each call runs in a worker thread
    (``asyncio.to_thread``) so the event loop keeps running.

    Parameters:
      api_key: Stripe secret key (``sk_live_...``/``sk_test_...``).
      api_base: Override of the API URL (default ``https://api.stripe.com``),
        e.g. ``http://localhost:12111`` for stripe-mock.
      timeout_ms: Connect and read timeout of one HTTP request, in
        milliseconds (ignored when ``http_client`` is given).
      max_network_retries: Retries inside the library (same idempotency key);
        default 0, see ``DEFAULT_MAX_NETWORK_RETRIES``.
      http_client: A ``stripe.HTTPClient`` to use instead of
        ``stripe.RequestsClient(timeout=timeout_ms / 1000)`` (tests plug in
        recorded responses here).
    """

    name = "stripe"
    #: Stripe docs, "Search": "data is searchable in less than a minute, but
    #: may be delayed during outages"; a charge that search does not find is
    #: trusted as never made only this long after the last charge request.
    lookup_settle_delay = timedelta(hours=1)

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str | None = None,
        timeout_ms: int = 20_000,
        max_network_retries: int = DEFAULT_MAX_NETWORK_RETRIES,
        http_client: stripe.HTTPClient | None = None,
    ) -> None:
        self.http_client = http_client or stripe.RequestsClient(timeout=timeout_ms / 1000)
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=max_network_retries,
            http_client=self.http_client,
        )

    @classmethod
    def check_amount(cls, amount_micros: int, currency: str) -> None:
        """Refuse an amount Stripe cannot charge in ``currency``: the rules of :func:`to_minor_units`, the one place they live.

        Raises:
          ProviderRejected: Not positive, not a whole number of the currency's
            minor units, or against Stripe's rule for the currency.
        """
        to_minor_units(amount_micros, currency)

    async def charge(
        self, *, amount_micros: int, currency: str, payment_method_ref: str, idempotency_key: str
    ) -> ChargeResult:
        """Charge ``amount_micros`` of ``currency`` to ``payment_method_ref`` with an off-session PaymentIntent.

        Parameters:
          amount_micros: Amount in micro-units of ``currency`` (> 0); sent in
            the currency's minor unit (:func:`to_minor_units`).
          currency: ISO 4217 code, any case (sent lowercased).
          payment_method_ref: ``"cus_XXX/pm_YYY"`` or ``"pm_YYY"``.
          idempotency_key: Sent as ``Idempotency-Key``; a repeat within 24 h
            returns Stripe's first answer without charging again.

        Returns:
          ChargeResult: ``succeeded`` with the PaymentIntent id, or declined
          with the PaymentIntent id (when Stripe created one) and Stripe's
          ``decline_code`` (else its error ``code``, e.g.
          ``authentication_required``, ``expired_card``).

        Raises:
          ProviderTimeout: No answer (network error or timeout); the charge may have happened.
          ProviderError: Rate limit, Stripe server error, or a payment still ``processing``.
          ProviderRejected: Stripe refused the request (key, permission,
            parameters, idempotency key reused with other parameters), an
            unexpected PaymentIntent status, or an amount or reference it
            cannot take; not retried.
        """
        customer, payment_method = parse_payment_method_ref(payment_method_ref)
        params: PaymentIntentCreateParams = {
            "amount": to_minor_units(amount_micros, currency),
            "currency": currency.lower(),
            "payment_method": payment_method,
            "off_session": True,
            "confirm": True,
            # no one is there to follow a redirect off-session; without this a
            # confirm on an account with redirect-based methods enabled asks for a return_url
            "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
            # lets operators find the PaymentIntent of a charge in the Dashboard
            "metadata": {"idempotency_key": idempotency_key},
        }
        if customer is not None:
            params["customer"] = customer
        try:
            intent = await asyncio.to_thread(
                self.client.v1.payment_intents.create, params, {"idempotency_key": idempotency_key}
            )
            if intent.status == "processing":
                # a repeat of the create replays this saved answer for 24 h;
                # the PaymentIntent itself tells whether it has finished since
                intent = await asyncio.to_thread(self.client.v1.payment_intents.retrieve, intent.id)
        except stripe.CardError as exc:
            error = exc.error
            intent_id = _field(_field(error, "payment_intent"), "id") or _field(error, "charge")
            return _declined(intent_id, error, "card_declined")
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        return self._result(intent)

    @staticmethod
    def _result(intent: stripe.PaymentIntent) -> ChargeResult:
        status = intent.status
        if status == "succeeded":
            return ChargeResult(succeeded=True, charge_id=intent.id)
        last_error = _field(intent, "last_payment_error")
        if status == "requires_payment_method":
            return _declined(intent.id, last_error, "card_declined")
        if status == "requires_action":
            # the customer would have to authenticate, and off-session they cannot
            return _declined(intent.id, last_error, "authentication_required")
        if status == "processing":
            # normal for bank debits, for days: the reconciler looks it up (lookup) until it settles
            return ChargeResult(succeeded=False, charge_id=intent.id, processing=True)
        # requires_confirmation, requires_capture, canceled: not reachable with
        # confirm=True and automatic capture; an operator has to look
        raise ProviderRejected(f"stripe: PaymentIntent {intent.id} has unexpected status {status!r}")

    async def lookup(self, *, idempotency_key: str, charge_id: str | None) -> ChargeLookup:
        """What became of the PaymentIntent made under ``idempotency_key`` (reconciliation).

        By id when we stored one (``GET /v1/payment_intents/{id}``), else by
        the ``metadata[idempotency_key]`` every charge carries (``GET
        /v1/payment_intents/search``; Stripe docs, "Search": results can lag
        writes by about a minute, hence :attr:`lookup_settle_delay`).

        Returns:
          ChargeLookup: ``succeeded``, ``processing``, ``declined``
          (``requires_payment_method``, ``requires_action``), ``failed``
          (``canceled``, or a status no charge follows from), or ``not_found``.

        Raises:
          ProviderTimeout, ProviderError: Stripe could not answer.
        """
        try:
            if charge_id is not None and charge_id.startswith("pi_"):
                intent = await asyncio.to_thread(self.client.v1.payment_intents.retrieve, charge_id)
            else:
                query = f"metadata['idempotency_key']:'{idempotency_key}'"
                found = await asyncio.to_thread(self.client.v1.payment_intents.search, {"query": query})
                if not found.data:
                    return ChargeLookup("not_found")
                intent = found.data[0]
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return ChargeLookup("not_found")
            raise _translate(exc) from exc
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        return _lookup_of(intent)

    async def list_charges(self, *, since: datetime, until: datetime) -> list[ProviderCharge]:
        """PaymentIntents created in ``[since, until)`` (``GET /v1/payment_intents``, every page).

        Stripe's ``created`` is in whole seconds: the window asked for is
        ``[floor(since), ceil(until))``, so a fraction of a second at either
        end is never lost.

        Raises:
          ProviderTimeout, ProviderError: Stripe could not answer.
        """
        params = {
            "created": {"gte": math.floor(since.timestamp()), "lt": math.ceil(until.timestamp())},
            "limit": 100,
        }

        def fetch() -> list[ProviderCharge]:
            page = self.client.v1.payment_intents.list(params)  # type: ignore[arg-type]
            charges = []
            for intent in page.auto_paging_iter():
                metadata = _field(intent, "metadata") or {}
                charges.append(
                    ProviderCharge(
                        idempotency_key=_field(metadata, "idempotency_key"),
                        charge_id=intent.id,
                        amount_micros=from_minor_units(int(intent.amount), intent.currency),
                        currency=intent.currency.upper(),
                        state=_lookup_of(intent).state,
                        created_at=datetime.fromtimestamp(int(intent.created), UTC),
                    )
                )
            return charges

        try:
            return await asyncio.to_thread(fetch)
        except stripe.StripeError as exc:
            raise _translate(exc) from exc

    async def close(self) -> None:
        """Close the HTTP client's connection pool (of the calling thread, for ``RequestsClient``)."""
        self.http_client.close()
