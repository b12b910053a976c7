"""``dramatiq harness.chaos_worker``: the billing actors on the chaos run's injected clock (harness only).

The same actors, broker and settings as ``dramatiq workers.actors``; the
only difference is time: the service, its renewal batcher and the fake
provider read "now" from :class:`workers.clock.OffsetClock` on the file
named by ``BILLING_CHAOS_CLOCK_FILE``, which ``make chaos`` moves forward
(clock jumps past key leases, top-up deadlines and grace periods) while
the workers run.  Production never imports this module.
"""

from __future__ import annotations

import os

from workers import actors, app
from workers.billing import BillingService
from workers.clock import OffsetClock

#: ``dramatiq harness.chaos_worker`` takes the broker from here (the actors are declared on it).
broker = actors.broker
CLOCK_FILE_ENV = "BILLING_CHAOS_CLOCK_FILE"

clock = OffsetClock(os.environ[CLOCK_FILE_ENV])
_build_service = app.worker().service_factory


def _service_on_clock() -> BillingService:
    """The process's service, on the injected clock (and its fake provider too)."""
    service = _build_service()
    service.clock = clock
    if hasattr(service.provider, "clock"):
        service.provider.clock = clock
    return service


# the actors and the outbox sweeper build the process's service with this
app.worker().service_factory = _service_on_clock
