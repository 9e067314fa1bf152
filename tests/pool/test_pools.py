"""Pool and ProcessPoolExecutor: one behaviour suite for the standard library,
``hyperpipe.get_context()`` and ``hyperpipe.install()``, under every start method."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from pool_support import TIMEOUT
import pool_support as support


def _executor(flavor, workers=2, **kwargs):
    if flavor.name == "hyperpipe-install":
        # install() reaches an executor made with no context at all (for fork: the default)
        if flavor.method == multiprocessing.get_start_method():
            return concurrent.futures.ProcessPoolExecutor(workers, **kwargs)
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=flavor.ctx, **kwargs)


def test_pool_map_imap_apply(flavor):
    with flavor.ctx.Pool(2) as pool:
        flavor.check_queue(pool._inqueue)
        flavor.check_queue(pool._outqueue)
        assert pool.map(support.inc, range(200), chunksize=1) == list(range(1, 201))
        assert list(pool.imap_unordered(support.inc, range(50))) != []
        assert sorted(pool.imap_unordered(support.inc, range(50))) == list(range(1, 51))
        assert pool.apply_async(support.inc, (41,)).get(TIMEOUT) == 42
        with pytest.raises(ValueError, match="three"):
            pool.map(support.fail_on, range(6))
        assert pool.map(support.inc, [1]) == [2]  # the pool goes on after a task failed
    pool.join()


def test_pool_arrays_in_and_out(fork_flavor):
    np = pytest.importorskip("numpy")
    arrays = [np.full(200_000, float(i)) for i in range(6)]  # 1.6 MB each: out of band
    with fork_flavor.ctx.Pool(2) as pool:
        results = pool.map(support.array_round_trip, arrays, chunksize=1)
    pool.join()
    for a, r in zip(arrays, results):
        assert np.array_equal(r, a * 2)
        r[0] = -1  # writable, as with the stdlib


def test_pool_replaces_a_worker_that_exits(fork_flavor):
    # maxtasksperchild: Pool forks replacement workers while its threads run.
    with fork_flavor.ctx.Pool(2, maxtasksperchild=5) as pool:
        pids = set(pool.map(support.pid_of, range(40), chunksize=1))
    pool.join()
    assert len(pids) >= 8


def test_pool_serves_tasks_after_a_busy_worker_is_killed(fork_flavor):
    # Pool's own behaviour: the dead worker's task is lost, the worker is replaced and new
    # tasks complete. (An idle worker holds the task queue's lock while it waits, so killing
    # one hangs the stdlib's Pool as it does ours: not tested.)
    started = fork_flavor.ctx.SimpleQueue()
    with fork_flavor.ctx.Pool(2, initializer=support.remember_queue, initargs=(started,)) as pool:
        pool.apply_async(support.report_pid_then_sleep)
        victim = started.get()
        os.kill(victim, signal.SIGKILL)
        assert pool.map(support.inc, range(100), chunksize=1) == list(range(1, 101))
        pool.terminate()
    pool.join()
    started.close()


def test_executor_map_submit_and_errors(flavor):
    with _executor(flavor) as ex:
        assert list(ex.map(support.inc, range(200))) == list(range(1, 201))
        assert list(ex.map(support.inc, range(200), chunksize=16)) == list(range(1, 201))
        future = ex.submit(support.fail_on, 3)
        with pytest.raises(ValueError, match="three"):
            future.result(TIMEOUT)
        if flavor.name != "hyperpipe-install" or flavor.method == multiprocessing.get_start_method():
            flavor.check_queue(ex._call_queue)
            flavor.check_queue(ex._result_queue)


def test_executor_unpicklable_task_fails_its_future(fork_flavor):
    with _executor(fork_flavor) as ex:
        future = ex.submit(support.inc, support.unpicklable())
        with pytest.raises(Exception, match="pickle|local object"):  # 3.13: "Can't get local object"
            future.result(TIMEOUT)
        assert ex.submit(support.inc, 1).result(TIMEOUT) == 2


def test_executor_worker_killed_breaks_the_pool(fork_flavor):
    with _executor(fork_flavor) as ex:
        assert ex.submit(support.inc, 1).result(TIMEOUT) == 2
        future = ex.submit(support.die, 0)
        with pytest.raises(BrokenProcessPool):
            future.result(TIMEOUT)
        with pytest.raises(BrokenProcessPool):
            ex.submit(support.inc, 1)


def test_executor_arrays(fork_flavor):
    np = pytest.importorskip("numpy")
    with _executor(fork_flavor) as ex:
        arrays = [np.full(100_000, float(i)) for i in range(4)]
        for a, r in zip(arrays, ex.map(support.array_round_trip, arrays)):
            assert np.array_equal(r, a * 2)


def test_install_reaches_default_constructors(impl):
    if impl != "hyperpipe-install":
        pytest.skip("install() only")
    from hyperpipe import _queues

    q = multiprocessing.Queue()
    sq = multiprocessing.SimpleQueue()
    jq = multiprocessing.JoinableQueue()
    a, b = multiprocessing.Pipe()
    try:
        assert all(_queues.is_hyperpipe_queue(x) for x in (q, sq, jq))
        assert type(a).__module__ == "hyperpipe"
    finally:
        for x in (q, jq):
            x.close()
        for c in (sq, a, b):
            c.close()


def test_install_and_uninstall_are_idempotent():
    import hyperpipe
    from hyperpipe import _queues

    stdlib_pipe = multiprocessing.connection.Pipe
    try:
        hyperpipe.install()
        hyperpipe.install()
        q = multiprocessing.SimpleQueue()
        assert _queues.is_hyperpipe_queue(q)
        q.close()
    finally:
        hyperpipe.uninstall()
        hyperpipe.uninstall()
    assert multiprocessing.connection.Pipe is stdlib_pipe
    q = multiprocessing.SimpleQueue()
    assert not _queues.is_hyperpipe_queue(q)
    q.close()


def test_get_context_defaults_and_errors():
    import hyperpipe

    ctx = hyperpipe.get_context()
    assert ctx.get_start_method() == multiprocessing.get_context().get_start_method()
    assert hyperpipe.get_context("spawn").get_start_method() == "spawn"
    assert hyperpipe.get_context("fork") is hyperpipe.get_context("fork")
    with pytest.raises(ValueError):
        hyperpipe.get_context("no-such-method")
    a, b = ctx.Pipe(duplex=False)
    with a, b:
        assert isinstance(a, hyperpipe.Connection) and not a.writable and not b.readable
