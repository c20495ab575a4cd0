"""kfopt's GPU regression-tracking benchmark suite (``pytest perf/``; see perf/README.md).

Not part of the installed package: a package only so that its modules import as ``perf.*`` and
pytest-benchmark can name this suite's device-time clock, ``perf.timing.cuda_event_clock``.
"""
