"""Reconciliation: the provider's charges under our keys against our top-up attempts and credits.

The audit's provider-side checks, for every provider (the fake one's table,
Stripe's PaymentIntents), both ways, over a time window:

* each charge the provider made under one of our keys
  (:data:`db.reconcile.PROVIDER_KEY_PREFIX`) in the window: a succeeded one
  has one attempt under that key, ``succeeded``, and exactly one ``top_up``
  credit of the same amount and currency; a processing one has a pending
  attempt; a declined or failed one has no credit; no key took money twice;
* each attempt created or credited in the window that we think succeeded
  (status ``succeeded`` or a credit) has a succeeded provider charge of the
  same amount and currency; a pending one with a succeeded charge is a
  credit not posted yet (``--settle`` posts it).

The provider is listed over ``[since, until + key_window)`` (and from the
window's oldest attempt on), so an attempt near the window's end finds a
charge made after it by a retry; only charges created in the window are
reported.  Read-only unless ``--settle``: then the window's pending
attempts go through the reconciler (:class:`workers.owners.Reconciler`) at
once, whatever their ``reconcile_after``, before the comparison.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from db import reconcile as ours_db
from db.engine import translate_errors
from db.money import BillingPolicy
from db.reconcile import PROVIDER_KEY_PREFIX, OurAttempt
from tasks.errors import ConfigurationError

from .clock import Clock, SystemClock
from .owners import Reconciler, ReconcilerReport
from .providers.base import PaymentProvider, ProviderCharge

__all__ = [
    "MISMATCH_KINDS",
    "EXIT_MISMATCHES",
    "Mismatch",
    "SettleReport",
    "ReconcileReport",
    "reconcile",
    "settle_window",
]

#: Exit status of ``billing reconcile`` when it finds mismatches: a finding,
#: neither bad input (2) nor a dependency down (1, e.g. Stripe unreachable).
EXIT_MISMATCHES = 3

#: kind -> what it means (the table's and the JSON's ``kind``).
MISMATCH_KINDS: dict[str, str] = {
    "charge_without_attempt": "the provider has a charge under one of our keys that no attempt knows",
    "charge_not_credited": "the provider took the money, the attempt is final, and no credit was posted",
    "charge_not_settled": "the provider took the money and the attempt is still pending (--settle credits it)",
    "charge_credited_twice": "one provider charge is credited more than once",
    "duplicate_charge": "more than one charge took money under one of our keys (the card was charged twice)",
    "credit_without_charge": "a credit, or a succeeded attempt, has no succeeded provider charge behind it",
    "amount_mismatch": "the charge's amount or currency differs from the attempt's or its credit's",
    "state_mismatch": "the provider is still processing a charge whose attempt we ended as declined or failed",
}


@dataclass(frozen=True)
class Mismatch:
    """One disagreement between the provider and us.

    Attributes:
      kind: One of :data:`MISMATCH_KINDS`.
      provider_key: Our provider idempotency key involved.
      charge_id: The provider's charge, when there is one.
      attempt_id: Our attempt, when there is one.
      account_id: The attempt's account, when there is one.
      provider_state: The charge's state at the provider (``succeeded``, ``processing``...), or None.
      attempt_status: The attempt's status, or None.
      provider_amount_micros: The charge's amount (micro-units of its currency), or None.
      attempt_amount_micros: The attempt's amount, or None.
      credited_micros: The sum of the attempt's ``top_up`` credits (0 when none), or None.
      currency: The charge's currency, else the attempt's.
      detail: One sentence for the operator.
    """

    kind: str
    provider_key: str | None
    charge_id: str | None
    attempt_id: str | None
    account_id: str | None
    provider_state: str | None
    attempt_status: str | None
    provider_amount_micros: int | None
    attempt_amount_micros: int | None
    credited_micros: int | None
    currency: str | None
    detail: str


@dataclass(frozen=True)
class SettleReport:
    """What ``--settle`` did.

    Attributes:
      taken: Pending attempts of the window taken for the reconciler (in-flight ones are left).
      reconciler: The reconciler's report on them (settled by state, unanswered).
      more: True when the window held more pending attempts than one run takes (run it again).
    """

    taken: int
    reconciler: ReconcilerReport
    more: bool = False


@dataclass(frozen=True)
class ReconcileReport:
    """The result of one reconciliation.

    Attributes:
      since, until: The window (UTC).
      provider: The provider's name.
      charges: The provider's charges under our keys created in the window.
      attempts: Our attempts compared (created or credited in the window, or named by a charge).
      in_flight: Pending attempts with no money taken yet, or a charge request still on its way.
      mismatches: What disagrees; empty when the two sides agree.
      settled: What ``--settle`` did, or None without it.
    """

    since: datetime
    until: datetime
    provider: str
    charges: int
    attempts: int
    in_flight: int
    mismatches: list[Mismatch] = field(default_factory=list)
    settled: SettleReport | None = None

    @property
    def ok(self) -> bool:
        """True when the provider and we agree."""
        return not self.mismatches

    def as_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (datetimes as ISO 8601 strings)."""
        return {
            "ok": self.ok,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "provider": self.provider,
            "charges": self.charges,
            "attempts": self.attempts,
            "in_flight": self.in_flight,
            "settled": None if self.settled is None else asdict(self.settled),
            "mismatches": [asdict(m) for m in self.mismatches],
        }


async def settle_window(
    engine: AsyncEngine,
    provider: PaymentProvider,
    *,
    since: datetime,
    until: datetime,
    policy: BillingPolicy,
    clock: Clock,
    limit: int = 1000,
) -> SettleReport:
    """Run the reconciler now on the pending attempts created in ``[since, until)`` (``--settle``).

    Their ``reconcile_after`` is not waited for; one whose charge lease has
    not run out (a charge request may be on its way) is left alone, and one
    the provider does not show yet stays pending (the reconciler's own rule).

    Raises:
      DatabaseUnavailable: PostgreSQL could not be reached.
    """
    reconciler = Reconciler(engine, provider, policy, clock)
    now = clock.now()
    async with (
        translate_errors(),
        engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn,
    ):
        due = await ours_db.claim_window_attempts(
            conn, since=since, until=until, now=now, relook_at=now + reconciler.relook, limit=limit
        )
    report = await reconciler.settle(due)
    return SettleReport(len(due), report, more=len(due) >= limit)


def _is_ours(charge: ProviderCharge) -> bool:
    return charge.idempotency_key is not None and charge.idempotency_key.startswith(PROVIDER_KEY_PREFIX)


class _Findings:
    """Mismatches, each reported once whichever way it was found."""

    def __init__(self) -> None:
        self.found: dict[tuple[str, str | None], Mismatch] = {}

    def add(
        self,
        kind: str,
        detail: str,
        *,
        charge: ProviderCharge | None = None,
        attempt: OurAttempt | None = None,
        key: str | None = None,
    ) -> None:
        ident = charge.charge_id if kind == "duplicate_charge" and charge else None
        dedupe = (
            kind,
            ident or (attempt.attempt_id if attempt else None) or (charge.charge_id if charge else key),
        )
        if dedupe in self.found:
            return
        self.found[dedupe] = Mismatch(
            kind=kind,
            provider_key=key
            or (charge.idempotency_key if charge else attempt.provider_key if attempt else None),
            charge_id=charge.charge_id if charge else attempt.provider_charge_id if attempt else None,
            attempt_id=attempt.attempt_id if attempt else None,
            account_id=attempt.account_id if attempt else None,
            provider_state=charge.state if charge else None,
            attempt_status=attempt.status if attempt else None,
            provider_amount_micros=charge.amount_micros if charge else None,
            attempt_amount_micros=attempt.amount_micros if attempt else None,
            credited_micros=sum(c.amount_micros for c in attempt.credits) if attempt else None,
            currency=charge.currency if charge else attempt.currency if attempt else None,
            detail=detail,
        )


def _amounts_differ(charge: ProviderCharge, attempt: OurAttempt) -> str | None:
    """Why ``charge`` does not pay for ``attempt``'s one credit, or None when it does."""
    credit = attempt.credits[0].amount_micros if attempt.credits else None
    if charge.currency.upper() != attempt.currency or attempt.currency != attempt.account_currency:
        return (
            f"the charge is in {charge.currency}, the attempt in {attempt.currency}, "
            f"the account in {attempt.account_currency}"
        )
    if charge.amount_micros != attempt.amount_micros or (
        credit is not None and credit != charge.amount_micros
    ):
        return (
            f"charged {charge.amount_micros} micros, attempt of {attempt.amount_micros}, "
            f"credited {credit if credit is not None else 0}"
        )
    return None


async def reconcile(
    engine: AsyncEngine,
    provider: PaymentProvider,
    *,
    since: datetime,
    until: datetime,
    settle: bool = False,
    policy: BillingPolicy | None = None,
    clock: Clock | None = None,
) -> ReconcileReport:
    """Compare the provider's charges under our keys with our attempts and credits over ``[since, until)``.

    Parameters:
      engine: Async engine on the billing database.
      provider: The provider the top-ups were charged with.
      since, until: The window, aware datetimes (UTC), ``since < until``.
      settle: First run the reconciler on the window's pending attempts
        (:func:`settle_window`; the only write).
      policy: The reconciler's rules (``--settle``); default :class:`BillingPolicy`.
      clock: Source of "now" (UTC): what counts as in flight, and ``--settle``'s time.

    Returns:
      ReconcileReport: ``ok`` when both sides agree.

    Raises:
      ConfigurationError: The provider cannot list its charges.
      ProviderTimeout, ProviderError: The provider could not answer.
      DatabaseUnavailable: PostgreSQL could not be reached.
    """
    clock = clock or SystemClock()
    settled = None
    if settle:
        settled = await settle_window(
            engine, provider, since=since, until=until, policy=policy or BillingPolicy(), clock=clock
        )
    async with translate_errors():
        window_attempts = await ours_db.our_attempts(engine, since=since, until=until)
    list_since = min([since, *(a.created_at for a in window_attempts)])
    try:
        listed = await provider.list_charges(since=list_since, until=until + provider.key_window)
    except NotImplementedError as exc:
        raise ConfigurationError(str(exc)) from exc
    charges = [c for c in listed if _is_ours(c)]
    async with translate_errors():
        attempts = await ours_db.our_attempts(
            engine,
            since=since,
            until=until,
            provider_keys={c.idempotency_key for c in charges if c.idempotency_key},
            charge_ids={c.charge_id for c in charges},
        )
    now = clock.now()
    by_key = {a.provider_key: a for a in attempts}
    by_charge_id = {a.provider_charge_id: a for a in attempts if a.provider_charge_id}
    charges_by_key: dict[str, list[ProviderCharge]] = defaultdict(list)
    for c in sorted(charges, key=lambda c: c.created_at):
        assert c.idempotency_key is not None
        charges_by_key[c.idempotency_key].append(c)

    def in_window(t: datetime) -> bool:
        return since <= t < until

    def attempts_of(c: ProviderCharge) -> list[OurAttempt]:
        found = [a for a in (by_key.get(c.idempotency_key or ""), by_charge_id.get(c.charge_id)) if a]
        return list({a.attempt_id: a for a in found}.values())

    def charges_of(a: OurAttempt) -> list[ProviderCharge]:
        found = list(charges_by_key.get(a.provider_key, []))
        found += [c for c in charges if c.charge_id == a.provider_charge_id and c not in found]
        return found

    def charging(a: OurAttempt) -> bool:
        return a.charge_lease_until is not None and a.charge_lease_until > now

    findings = _Findings()
    in_flight = 0
    reported = [c for c in charges if in_window(c.created_at)]

    # one way: every charge the provider made under our keys in the window
    for c in reported:
        key = c.idempotency_key
        paid_under_key = [x for x in charges_by_key[key or ""] if x.state == "succeeded"]
        if c.state == "succeeded" and paid_under_key and paid_under_key[0] is not c:
            findings.add(
                "duplicate_charge",
                f"{len(paid_under_key)} charges took money under this key; {paid_under_key[0].charge_id} "
                "is the one credited at most",
                charge=c,
                attempt=by_key.get(key or ""),
            )
        related = attempts_of(c)
        credits = [cr for a in related for cr in a.credits]
        first = related[0] if related else None
        if c.state == "succeeded":
            if first is None:
                findings.add(
                    "charge_without_attempt", "money taken under our key, no attempt has it", charge=c
                )
            elif len(credits) > 1:
                findings.add(
                    "charge_credited_twice",
                    f"credited {len(credits)} times (ledger entries "
                    f"{', '.join(str(cr.ledger_entry_id) for cr in credits)})",
                    charge=c,
                    attempt=first,
                )
            elif not credits:
                if first.status == "pending":
                    if charging(first):
                        in_flight += 1
                    else:
                        findings.add(
                            "charge_not_settled",
                            "the attempt is pending; --settle credits it",
                            charge=c,
                            attempt=first,
                        )
                else:
                    findings.add(
                        "charge_not_credited",
                        f"the attempt is {first.status} with no credit",
                        charge=c,
                        attempt=first,
                    )
            else:
                credited = next(a for a in related if a.credits)
                why = _amounts_differ(c, credited)
                if why:
                    findings.add("amount_mismatch", why, charge=c, attempt=credited)
                elif credited.status != "succeeded":
                    findings.add(
                        "state_mismatch",
                        f"credited, but the attempt is {credited.status}",
                        charge=c,
                        attempt=credited,
                    )
        elif c.state == "processing":
            if first is None:
                findings.add(
                    "charge_without_attempt",
                    "a charge still processing under our key, no attempt has it",
                    charge=c,
                )
            elif credits:
                findings.add(
                    "credit_without_charge",
                    "credited while the provider is still processing the charge",
                    charge=c,
                    attempt=first,
                )
            elif first.status in ("declined", "failed"):
                findings.add(
                    "state_mismatch",
                    f"the provider is still processing it, the attempt is {first.status}",
                    charge=c,
                    attempt=first,
                )
        elif credits:
            credited = next(a for a in related if a.credits)
            findings.add(
                "credit_without_charge",
                f"credited, but the provider's charge is {c.state}",
                charge=c,
                attempt=credited,
            )

    # the other way: every attempt created or credited in the window
    compared = [
        a for a in attempts if in_window(a.created_at) or any(in_window(cr.created_at) for cr in a.credits)
    ]
    for a in compared:
        found = charges_of(a)
        paid = [c for c in found if c.state == "succeeded"]
        if a.credits or a.status == "succeeded":
            if not paid:
                states = ", ".join(f"{c.charge_id} {c.state}" for c in found) or "none under its key"
                findings.add(
                    "credit_without_charge",
                    f"{'credited' if a.credits else 'succeeded, not credited'}; provider charges: {states}",
                    charge=found[0] if found else None,
                    attempt=a,
                )
                continue
            if not a.credits:
                findings.add(
                    "charge_not_credited", "the attempt succeeded with no credit", charge=paid[0], attempt=a
                )
            elif len(a.credits) > 1:
                findings.add(
                    "charge_credited_twice", f"credited {len(a.credits)} times", charge=paid[0], attempt=a
                )
            else:
                why = _amounts_differ(paid[0], a)
                if why:
                    findings.add("amount_mismatch", why, charge=paid[0], attempt=a)
            for extra in paid[1:]:
                findings.add(
                    "duplicate_charge",
                    f"{len(paid)} charges took money under this key; one credit",
                    charge=extra,
                    attempt=a,
                )
        elif a.status == "pending":
            if paid and not charging(a):
                findings.add(
                    "charge_not_settled",
                    "the attempt is pending; --settle credits it",
                    charge=paid[0],
                    attempt=a,
                )
            elif not paid:
                in_flight += 1
        elif paid:
            findings.add(
                "charge_not_credited", f"the attempt is {a.status} with no credit", charge=paid[0], attempt=a
            )
        elif any(c.state == "processing" for c in found):
            processing = next(c for c in found if c.state == "processing")
            findings.add(
                "state_mismatch",
                f"the provider is still processing it, the attempt is {a.status}",
                charge=processing,
                attempt=a,
            )

    return ReconcileReport(
        since=since,
        until=until,
        provider=provider.name,
        charges=len(reported),
        attempts=len(compared),
        in_flight=in_flight,
        mismatches=list(findings.found.values()),
        settled=settled,
    )
