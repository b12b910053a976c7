"""``make bench``: this project's throughput and latency against the limit, side by side in one run.

Run ``python -m bench --help`` (or ``make bench``); ``docs/benchmarks.md``
holds the figures of the last full run.  Modules:

* :mod:`bench.runner`: the run (data, interleaved rounds, latency, scaling, figures);
* :mod:`bench.config`: :class:`~bench.config.BenchConfig` from options and ``BENCH_*`` variables;
* :mod:`bench.services`: PostgreSQL, Redis and fresh databases (through
  :mod:`harness.services`), the Redis helpers and the CPU accounting;
* :mod:`bench.measure`: each setup measured once, the latency run, the scheduler, the profile;
* :mod:`bench.renewal_script`: the pgbench script of one renewal, generated
  from ``db/money.py`` (committed as ``bench/renewal.sql``);
* :mod:`bench.mixed_script`: the pgbench scripts of the mixed workload's four
  kinds, generated from ``db/sql/`` (committed in ``bench/mixed_limit/``);
* :mod:`bench.data`: the accounts, plans and subscriptions, in bulk SQL;
* :mod:`bench.noop`, :mod:`bench.naive`, :mod:`bench.naive_usage`,
  :mod:`bench.naive_mixed`: the broker's ceiling and the naive baselines
  (renewals, usage, the four kinds of the mixed workload), each a stock
  Dramatiq worker module;
* :mod:`bench.report`: the table, ``docs/benchmarks.md`` and the chart;
* :mod:`bench.stats`: summaries, ratios, percentiles, pgbench and profile parsing.
"""

__all__ = [
    # queues and actors of the stock Dramatiq workers (bench.noop, bench.naive, bench.naive_usage,
    # bench.naive_mixed)
    "NOOP_QUEUE",
    "NOOP_ACTOR",
    "NAIVE_QUEUE",
    "NAIVE_ACTOR",
    "NAIVE_USAGE_QUEUE",
    "NAIVE_USAGE_ACTOR",
    "NAIVE_MIXED_QUEUE",
    "NAIVE_MIXED_ACTORS",
]

NOOP_QUEUE = "bench.noop"
NOOP_ACTOR = "bench_noop"
NAIVE_QUEUE = "bench.naive"
NAIVE_ACTOR = "bench_naive_renew"
NAIVE_USAGE_QUEUE = "bench.naive_usage"
NAIVE_USAGE_ACTOR = "bench_naive_record_usage"
NAIVE_MIXED_QUEUE = "bench.naive_mixed"
#: The naive mixed peer's actor for each kind of the contract (``tasks.messages`` actor name -> its own).
NAIVE_MIXED_ACTORS = {
    "subscribe": "bench_naive_mixed_subscribe",
    "renew": "bench_naive_mixed_renew",
    "auto_top_up": "bench_naive_mixed_auto_top_up",
    "revoke_key": "bench_naive_mixed_revoke_key",
}
