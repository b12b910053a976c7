"""Group commit of plain renewals: the renewal fast path of :class:`workers.billing.BillingService`."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog

from db import money
from db.engine import translate_errors
from tasks.messages import RenewMessage

if TYPE_CHECKING:
    from .billing import BillingService

__all__ = ["RenewalBatcher"]

log = structlog.get_logger("billing")


class RenewalBatcher:
    """Group commit for ``renew``: claims, then applies, the renewals that arrive together, in two statements.

    Each of a worker's threads hands its renewal to the process's event
    loop; while one batch is at PostgreSQL the next ones gather here.  A
    batch costs two round trips and two commits whatever its size: one
    autocommit statement claims every key (:func:`db.money.claim_keys`,
    committed first, so deliveries are counted even if the effect never
    commits), one applies every plain renewal whose claim allows it
    (:func:`db.money.renew_fast_batch`, each in its own subtransaction).
    Every message keeps its own key, outcome and errors: a renewal that is
    not plain (short funds, past_due, cancel at period end, catch-up) or
    failed comes back as None and takes the Python path alone; a batch that
    fails as a whole (PostgreSQL unreachable) fails each of its messages
    with the same transient error, to be retried.  A key that is already in
    the forming batch waits for the next one (one statement cannot claim a
    key twice).  Idle, a renewal goes alone at once: no added latency.

    Parameters:
      service: The service (engine, clock, max deliveries).
      max_batch: Most renewals per batch.
    """

    def __init__(self, service: BillingService, *, max_batch: int = 64, max_in_flight: int = 1) -> None:
        self.service = service
        self.max_batch = max(1, max_batch)
        self.max_in_flight = max(1, max_in_flight)
        self._waiting: list[tuple[RenewMessage, str, str, asyncio.Future[Any]]] = []
        self._in_flight = 0
        #: Batches run, the largest one, and renewals applied by the fast path (for tests and profiles).
        self.batches = 0
        self.largest_batch = 0
        self.applied = 0
        #: Why renewals took the Python path instead: reason -> count.
        self.fallbacks: dict[str, int] = {}

    async def submit(
        self, message: RenewMessage, fingerprint: str, message_id: str
    ) -> tuple[money.ClaimedKey, dict[str, Any] | None]:
        """Claim ``message``'s key and apply it if plain; returns its claim and its outcome (None: not applied).

        Raises:
          DatabaseUnavailable: The batch could not reach PostgreSQL (transient).
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((message, fingerprint, message_id, future))
        self._start_batches()
        result: tuple[money.ClaimedKey, dict[str, Any] | None] = await future
        return result

    def _start_batches(self) -> None:
        """Send what is waiting, in batches, while fewer than ``max_in_flight`` batches are at PostgreSQL."""
        while self._waiting and self._in_flight < self.max_in_flight:
            batch: list[tuple[RenewMessage, str, str, asyncio.Future[Any]]] = []
            later: list[tuple[RenewMessage, str, str, asyncio.Future[Any]]] = []
            keys: set[str] = set()
            for item in self._waiting:
                if len(batch) < self.max_batch and item[0].idempotency_key not in keys:
                    batch.append(item)
                    keys.add(item[0].idempotency_key)
                else:
                    later.append(item)
            self._waiting = later
            self._in_flight += 1
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            asyncio.ensure_future(self._send(batch))

    async def _send(self, batch: list[tuple[RenewMessage, str, str, asyncio.Future[Any]]]) -> None:
        try:
            outcomes = await self._run([(m, f, i) for m, f, i, _ in batch])
        except BaseException as exc:  # noqa: BLE001 - each message of the batch gets the batch's error
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for message, _, _, future in batch:
                if not future.done():
                    future.set_result(outcomes[message.idempotency_key])
        finally:
            self._in_flight -= 1
            self._start_batches()

    async def _run(
        self, batch: list[tuple[RenewMessage, str, str]]
    ) -> dict[str, tuple[money.ClaimedKey, dict[str, Any] | None]]:
        service = self.service
        async with translate_errors(), service.autocommit.connect() as conn:
            claims = await money.claim_keys(
                conn,
                [money.KeyClaim(m.idempotency_key, "renew", f, None, i) for m, f, i in batch],
                lease_expires_at=service.clock.now() + service.policy.key_lease,
            )
            to_apply = [
                m
                for m, _, _ in batch
                if not (c := claims[m.idempotency_key]).conflict
                and c.status not in ("completed", "waiting_for_funds")
                and c.attempts <= service.max_deliveries
            ]
            for m, _, _ in batch:  # claimed (committed), nothing applied
                service.crash("fast_after_claim", m.idempotency_key)
            applied = await money.renew_fast_batch(conn, to_apply, service.clock.now()) if to_apply else {}
        for m, _, _ in batch:  # applied (committed), no delivery told
            service.crash("fast_after_apply", m.idempotency_key)
        outcomes: dict[str, tuple[money.ClaimedKey, dict[str, Any] | None]] = {}
        for m, _, _ in batch:
            result = applied.get(m.idempotency_key)
            if result is not None and "fallback" in result:
                self.fallbacks[result["fallback"]] = self.fallbacks.get(result["fallback"], 0) + 1
                if (
                    result["fallback"] == "error"
                ):  # e.g. a deadlock between batches: the Python path retries it
                    log.info(
                        "renew_fast_path_fallback", idempotency_key=m.idempotency_key, error=result["error"]
                    )
                result = None
            elif result is not None and not result.get("duplicate"):
                self.applied += 1
            outcomes[m.idempotency_key] = (claims[m.idempotency_key], result)
        return outcomes
