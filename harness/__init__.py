"""The harness: the demo, chaos, the bench's services and the tests' services; never imported by the runtime.

* :mod:`harness.services`: one way to bring up PostgreSQL, Redis, a fresh
  database, workers, and to drain the queues;
* :mod:`harness.demo`, :mod:`harness.demo_months`: ``billing demo``
  (:mod:`harness.demo_cli`, loaded by the ``billing`` CLI from the entry-point group ``billing.commands``);
* :mod:`harness.chaos`: ``make chaos``;
* :mod:`harness.chaos_worker`: the billing actors on the chaos run's injected clock.
"""
