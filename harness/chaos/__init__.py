"""``make chaos`` (``python -m harness.chaos``): faults injected while load flows, then an independent check.

Modules, in the order a run uses them:

* :mod:`~harness.chaos.config`: constants, :class:`ChaosConfig`, the fault schedule, the run's state;
* :mod:`~harness.chaos.pool`: the run's database and Redis, the worker slots, the scheduler process;
* :mod:`~harness.chaos.load`: accounts, the producers' messages, the producer processes;
* :mod:`~harness.chaos.faults`: the faults, injected while the load flows;
* :mod:`~harness.chaos.drive`: the drain, and the owners driven past their deadlines;
* :mod:`~harness.chaos.oracle`: the three numbers (double charges, lost effects, unpaid periods);
* :mod:`~harness.chaos.figures`, :mod:`~harness.chaos.report`: the figures, the table, the docs;
* :mod:`~harness.chaos.run`: :func:`run_chaos` and the command line.
"""

from __future__ import annotations

from .config import ChaosConfig, Fault, plan_faults
from .drive import stranded_delayed
from .figures import retries_not_enqueued, soak_verdict
from .oracle import (
    DOUBLE_CHARGE_CHECKS,
    LOST_EFFECT_CHECKS,
    UNPAID_ENTITLED_CHECKS,
    PromiseReport,
    count_promise,
)
from .run import main, run_chaos

__all__ = [
    "DOUBLE_CHARGE_CHECKS",
    "LOST_EFFECT_CHECKS",
    "UNPAID_ENTITLED_CHECKS",
    "ChaosConfig",
    "Fault",
    "PromiseReport",
    "count_promise",
    "main",
    "plan_faults",
    "retries_not_enqueued",
    "run_chaos",
    "soak_verdict",
    "stranded_delayed",
]
