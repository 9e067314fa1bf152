"""hyperpipe's benchmark: ``python -m hyperpipe.bench`` (or the ``hyperpipe-bench`` script).

Compares hyperpipe, once per available transport, with ``multiprocessing.Pipe`` (always
run, so every number has a ratio) and, when installed, pyzmq and faster-fifo: round-trip
latency, streaming, large numpy arrays with peak RSS, and the CPU of an idle receiver.
``python -m hyperpipe.bench --help`` lists the options; docs/benchmarks.md describes the
method and keeps one full run.

Modules: ``_impls`` (the implementations), ``_scenarios`` (what the two worker processes do
and how one measurement is run and cleaned up), ``_report`` (statistics, targets, table,
plot), ``_cli`` (options and orchestration).
"""
