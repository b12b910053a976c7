"""``billing demo``: the ``demo`` command of the ``billing`` CLI, from the harness.

The runtime never imports the harness: the CLI loads this command from the
entry-point group ``billing.commands`` (``pyproject.toml``:
``demo = "harness.demo_cli:demo"``).  Without ``--months`` it runs
:func:`harness.demo.run_demo` (worker processes on a generated workload);
with ``--months N``, :func:`harness.demo_months.run_demo_months` (the
lifecycle over N months on an accelerated clock).  Exit status 1 when the
audit fails.
"""

from __future__ import annotations

import sys

import click

__all__ = ["demo"]


@click.command("demo")
@click.option(
    "--accounts",
    "accounts",
    type=click.IntRange(10, None),
    default=None,
    help="Accounts to create.  [default: 1000; 200 with --months]",
)
@click.option(
    "--messages",
    "messages",
    type=click.IntRange(100, None),
    default=5000,
    show_default=True,
    help="Messages to publish, at least (not with --months).",
)
@click.option(
    "--processes",
    "-p",
    "processes",
    type=click.IntRange(1, 16),
    default=2,
    show_default=True,
    help="Worker processes (with --months: one in-process worker).",
)
@click.option("--threads", "-t", "threads", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option(
    "--seed", "seed", type=int, default=7, show_default=True, help="Seed of the generated workload."
)
@click.option(
    "--timeout-s",
    "timeout_s",
    type=int,
    default=600,
    show_default=True,
    help="Give up draining after this many seconds (with --months: per simulated day).",
)
@click.option(
    "--months",
    "months",
    type=click.IntRange(1, 120),
    default=None,
    help="Instead: run the renewal scheduler over this many months on an accelerated clock, "
    "one day per step, and print a table per month.",
)
def demo(
    accounts: int | None,
    messages: int,
    processes: int,
    threads: int,
    seed: int,
    timeout_s: int,
    months: int | None,
) -> None:
    """Run the whole system on a generated workload, then audit it (exit 1 if the audit fails)."""
    if months is not None:
        from .demo_months import run_demo_months

        ok = run_demo_months(
            months=months, accounts=accounts or 200, threads=threads, seed=seed, timeout_s=timeout_s
        )
        sys.exit(0 if ok else 1)

    from .demo import run_demo

    ok = run_demo(
        accounts=accounts or 1000,
        messages=messages,
        processes=processes,
        threads=threads,
        seed=seed,
        timeout_s=timeout_s,
    )
    sys.exit(0 if ok else 1)
