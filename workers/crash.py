"""Crash points: simulate a worker dying at an exact step of the money path.

In production nothing is configured and :func:`crashpoint` is a set lookup.
Tests configure ``BILLING_CRASHPOINTS`` (``name`` or ``name:key-substring``,
comma separated) in a worker subprocess, which then exits with status 86 at
that step, exactly as a SIGKILL would leave it; or they set
``service.crashpoints`` in-process, which raises :class:`SimulatedCrash`.

Steps: ``before_commit`` (effect written, transaction open),
``after_commit`` (committed, outbox not relayed, message not acked),
``after_top_up_intent`` (attempt recorded, provider not called),
``after_provider_charge`` (provider charged, ledger not credited); on the
fast path (:class:`workers.group_commit.GroupCommit`, whose keys are
claimed in one autocommit statement and applied in another):
``fast_after_claim`` (the batch's keys claimed and committed, nothing
applied), ``fast_before_commit`` (usage events applied, their transaction
open) and ``fast_after_apply`` (applied and committed, no delivery told).
A message whose key matches a Python-path step takes the Python path; one
that matches only fast-path steps keeps the fast path.
"""

from __future__ import annotations

import os

__all__ = ["CRASH_EXIT_STATUS", "FAST_PATH_CRASHPOINTS", "SimulatedCrash", "parse_crashpoints", "crashpoint"]

#: Exit status of a process stopped at a crash point.
CRASH_EXIT_STATUS = 86

#: The crash points of the fast path (the others are the Python path's steps).
FAST_PATH_CRASHPOINTS = frozenset({"fast_after_claim", "fast_before_commit", "fast_after_apply"})


class SimulatedCrash(BaseException):  # noqa: N818 - not an error: a process death
    """A simulated process death (BaseException so nothing in the worker swallows it)."""


def parse_crashpoints(spec: str) -> dict[str, str]:
    """``"a,b:key"`` -> ``{"a": "", "b": "key"}``."""
    points: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, _, key = item.partition(":")
        points[name] = key
    return points


def crashpoint(points: dict[str, str], name: str, key: str, *, exit_process: bool) -> None:
    """Die here if ``name`` is configured (and its key filter is in ``key``)."""
    if name not in points or points[name] not in key:
        return
    if exit_process:
        os._exit(CRASH_EXIT_STATUS)
    raise SimulatedCrash(name)
