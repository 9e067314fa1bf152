"""The benchmark's queue throughput rows run (the numbers come from ``hyperpipe-bench``)."""

from __future__ import annotations

import multiprocessing

import pytest

from hyperpipe.bench import _pool


@pytest.mark.parametrize("name", ["mp", "hp"])
def test_a_queue_throughput_run_moves_every_item_and_leaves_no_process(name):
    impl = next(i for i in _pool.queue_impls("fork") if i.name == name)
    rate = _pool._queue_run(impl, 400, 2, 2)  # timed once every process waits at the barrier
    assert rate > 0
    assert multiprocessing.active_children() == []
