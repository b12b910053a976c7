"""Group commit: the fast path of the kinds whose messages arrive by the thousand (``renew``, ``record_usage``).

Each of a worker's threads hands its message to the process's event loop;
while one batch is at PostgreSQL the next ones gather here.  A batch costs
a fixed number of round trips whatever its size: one autocommit statement
claims every key (:func:`db.money.claim_keys`, committed first, so
deliveries are counted even if the effect never commits), then one
statement applies what the claims allow, the kind's server-side batch
function:

* ``renew``: :func:`db.money.renew_fast_batch`, every plain renewal in its
  own subtransaction, on the same autocommit connection;
* ``record_usage``: :func:`db.money.record_usage.record_usage_batch`, the
  events grouped by account (one account lock, one ledger entry, one
  balance update per account, each account in its own subtransaction), in
  a transaction that also asks for the top-ups the debits call for and
  writes them to the outbox, relayed after commit.

Every message keeps its own key, outcome and errors: a message the batch
did not apply (a renewal that is not plain, an unknown account, an error)
comes back as None and takes the Python path alone; a batch that fails as
a whole (PostgreSQL unreachable) fails each of its messages with the same
transient error, to be retried.  A key that is already in the forming batch
waits for the next one (one statement cannot claim a key twice).  Idle, a
message goes alone on the event loop's next turn: no added latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from db import money
from db.engine import transaction, translate_errors
from db.money import record_usage as record_usage_kind
from tasks.messages import BillingMessage, RecordUsageMessage, RenewMessage

from .outbox import relay_committed

if TYPE_CHECKING:
    from .billing import BillingService

__all__ = ["GroupCommit", "FastPath", "FAST_PATHS"]

log = structlog.get_logger("billing")

#: ``apply(service, conn, messages) -> key -> outcome``: the claimed messages applied in one statement
#: (``conn`` is the claim's autocommit connection).
BatchApply = Callable[["BillingService", AsyncConnection, list[Any]], Awaitable[dict[str, dict[str, Any]]]]


@dataclass(frozen=True)
class FastPath:
    """One kind's group commit.

    Attributes:
      actor_name: The kind.
      keeps_request: Store each message with its claim, so the completer can
        re-send it if its lease runs out (a renewal needs none: the scheduler
        sends its period again while it is due).
      apply: Applies the claimed messages (see :data:`BatchApply`).
    """

    actor_name: str
    keeps_request: bool
    apply: BatchApply


async def _apply_renewals(
    service: BillingService, conn: AsyncConnection, messages: list[RenewMessage]
) -> dict[str, dict[str, Any]]:
    return await money.renew_fast_batch(conn, messages, service.clock.now())


async def _apply_usage(
    service: BillingService, conn: AsyncConnection, messages: list[RecordUsageMessage]
) -> dict[str, dict[str, Any]]:
    async with transaction(service.engine) as tx:
        results, outbox = await record_usage_kind.record_usage_batch(
            tx, messages, service.clock.now(), service.policy
        )
        await money.insert_outbox(tx, outbox)
        for m in messages:  # applied, not committed
            service.crash("fast_before_commit", m.idempotency_key)
    await relay_committed(service.engine, service.broker, outbox)
    return results


#: Actor name -> its group commit.
FAST_PATHS: dict[str, FastPath] = {
    "renew": FastPath("renew", keeps_request=False, apply=_apply_renewals),
    "record_usage": FastPath("record_usage", keeps_request=True, apply=_apply_usage),
}

_Item = tuple[BillingMessage, str, str, "asyncio.Future[Any]"]


class GroupCommit:
    """Claims, then applies, the messages of one kind that arrive together, in a fixed number of statements.

    Parameters:
      service: The service (engine, clock, policy, max deliveries, crash points).
      path: The kind's :class:`FastPath`.
      max_batch: Most messages per batch.
      max_in_flight: Batches of this kind at PostgreSQL at once.
    """

    def __init__(
        self, service: BillingService, path: FastPath, *, max_batch: int = 64, max_in_flight: int = 1
    ) -> None:
        self.service = service
        self.path = path
        self.max_batch = max(1, max_batch)
        self.max_in_flight = max(1, max_in_flight)
        self._waiting: list[_Item] = []
        self._in_flight = 0
        self._start_scheduled = False
        #: Batches run, the largest one, and messages applied by the fast path (for tests and profiles).
        self.batches = 0
        self.largest_batch = 0
        self.applied = 0
        #: Why messages took the Python path instead: reason -> count.
        self.fallbacks: dict[str, int] = {}

    async def submit(
        self, message: BillingMessage, fingerprint: str, message_id: str
    ) -> tuple[money.ClaimedKey, dict[str, Any] | None]:
        """Claim ``message``'s key and apply it if the batch can; returns its claim and its outcome (None: not applied).

        Raises:
          DatabaseUnavailable: The batch could not reach PostgreSQL (transient).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((message, fingerprint, message_id, future))
        if not self._start_scheduled:
            # on the loop's next turn, so the messages a batch thread hands
            # over together (each a task of the same turn) go as one batch
            self._start_scheduled = True
            loop.call_soon(self._scheduled_start)
        result: tuple[money.ClaimedKey, dict[str, Any] | None] = await future
        return result

    def _scheduled_start(self) -> None:
        self._start_scheduled = False
        self._start_batches()

    def _start_batches(self) -> None:
        """Send what is waiting, in batches, while fewer than ``max_in_flight`` batches are at PostgreSQL."""
        while self._waiting and self._in_flight < self.max_in_flight:
            batch: list[_Item] = []
            later: list[_Item] = []
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

    async def _send(self, batch: list[_Item]) -> None:
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

    def _claim(self, message: BillingMessage, fingerprint: str, message_id: str) -> money.KeyClaim:
        request = (
            money.message_request(message.actor_name, message.queue_name, message.kwargs())
            if self.path.keeps_request
            else None
        )
        return money.KeyClaim(
            message.idempotency_key,
            message.actor_name,
            fingerprint,
            getattr(message, "account_id", None),
            message_id,
            request,
        )

    async def _run(
        self, batch: list[tuple[BillingMessage, str, str]]
    ) -> dict[str, tuple[money.ClaimedKey, dict[str, Any] | None]]:
        service = self.service
        async with translate_errors(), service.autocommit.connect() as conn:
            claims = await money.claim_keys(
                conn,
                [self._claim(m, f, i) for m, f, i in batch],
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
            applied = await self.path.apply(service, conn, to_apply) if to_apply else {}
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
                        "fast_path_fallback",
                        actor=m.actor_name,
                        idempotency_key=m.idempotency_key,
                        error=result["error"],
                    )
                result = None
            elif result is not None and not result.get("duplicate"):
                self.applied += 1
            outcomes[m.idempotency_key] = (claims[m.idempotency_key], result)
        return outcomes
