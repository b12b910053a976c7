"""The ``billing`` CLI: the root group and error handling (:mod:`.root`), and one module per area.

:mod:`.accounts` (``db``, ``account``, ``plan``, ``subscription``),
:mod:`.publish` (``publish <kind>``, generated from the contract),
:mod:`.services` (``worker``, ``scheduler``, ``audit``, ``contract``),
:mod:`.keys` (``keys``), :mod:`.reconcile` (``reconcile``), and
:mod:`workers.operators.cli` (``ops``) and :mod:`workers.operators.dashboard`
(``dashboard``); :mod:`.common` holds what they share.
"""

from .root import app, main

__all__ = ["app", "main"]
