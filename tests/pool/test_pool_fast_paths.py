"""Pool's parent under hyperpipe (``_pool``): the task handler's put that names a task's
functions once, and the worker handler that no longer wakes on results. Each checked on
its own (the fast path and every fallback) and through Pools of every flavor."""

from __future__ import annotations

import functools
import multiprocessing.pool as mpp
import operator
import pickle

import pytest

import hyperpipe
from hyperpipe import _pool

import pool_support as support
from pool_support import TIMEOUT


@pytest.fixture
def sender():
    """A ``_TaskSender`` on a hyperpipe task queue, and what arrived at its reader."""
    q = hyperpipe.get_context("fork").SimpleQueue()
    task_sender = _pool._TaskSender(q._writer)
    yield task_sender, q._reader
    q._reader.close()
    q._writer.close()


def _received(reader) -> bytes:
    assert reader.poll(TIMEOUT)
    return reader.recv_bytes()


MAP_TASKS = [
    (3, 0, mpp.mapstar, ((support.inc, (1, 2, 3)),), {}),
    (4, 7, mpp.starmapstar, ((divmod, ((7, 2), (9, 4))),), {}),
    (5, 0, support.inc, (41,), {}),  # apply_async
    (6, 0, support.inc, (), {"x": 1}),  # keywords
    (2**31 - 1, 2**40, mpp.mapstar, ((len, ("ab", b"\x00" * 70_000)),), {}),  # big ints, a 2-frame chunk
]


@pytest.mark.parametrize("task", MAP_TASKS, ids=["map", "starmap", "apply", "keywords", "big"])
def test_a_task_arrives_as_the_stdlib_pickles_it(sender, task):
    task_sender, reader = sender
    fast = task_sender._pickle(task)
    assert fast is not None and fast != pickle.dumps(task, 5)  # the functions named up front
    task_sender.put(task)
    data = _received(reader)
    assert data == fast
    # what a worker does with it (the C unpickler), and the pure-Python one agrees
    assert pickle.loads(data) == task and pickle._loads(data) == task
    assert pickle.loads(data)[2] is task[2]


def test_the_functions_are_named_once_per_run_of_tasks(sender, monkeypatch):
    task_sender, reader = sender
    built = []
    monkeypatch.setattr(_pool, "_head", lambda fns, build=_pool._head: built.append(fns) or build(fns))
    for i in range(5):
        task_sender.put((9, i, mpp.mapstar, ((support.inc, (i,)),), {}))
    task_sender.put((9, 5, mpp.starmapstar, ((divmod, ((i, 1),)),), {}))
    assert built == [(mpp.mapstar, support.inc), (mpp.starmapstar, divmod)]
    assert [pickle.loads(_received(reader)) for _ in range(6)][4] == (9, 4, mpp.mapstar, ((support.inc, (4,)),), {})


def test_a_pool_s_map_tasks_name_both_functions(monkeypatch):
    named = []
    monkeypatch.setattr(_pool, "_head", lambda fns, build=_pool._head: named.append(fns) or build(fns))
    with hyperpipe.get_context("fork").Pool(1) as pool:
        assert pool.map(support.inc, range(5), chunksize=2) == [1, 2, 3, 4, 5]
        assert pool.starmap(divmod, [(7, 2)]) == [(3, 1)]
    pool.join()
    assert named == [(mpp.mapstar, support.inc), (mpp.starmapstar, divmod)]


OTHER_TASKS = [
    None,  # the sentinel that stops a worker
    (1, 0, mpp.mapstar, ((functools.partial(divmod, 7), (1,)),), {}),  # a partial: pickled each time
    (1, 0, mpp.mapstar, ((support.inc, (pickle.PickleBuffer(bytearray(1 << 17)),)),), {}),  # out of band
    (1, 0, operator.attrgetter("real"), (1,), {}),  # a callable with state
    (1, 0, mpp.mapstar, ((support.OwnFeederQueue._feed, (1,)),), {}),  # a nested name
]


@pytest.mark.parametrize("task", OTHER_TASKS, ids=["sentinel", "partial", "oob", "state", "nested"])
def test_other_tasks_go_through_connection_send(sender, task, monkeypatch):
    task_sender, reader = sender
    assert task_sender._pickle(task) is None
    sent = []
    send = task_sender._conn.send
    monkeypatch.setattr(task_sender._conn, "send", lambda obj: sent.append(obj) or send(obj))
    task_sender.put(task)
    assert sent == [task]
    arrived = reader.recv()
    if task is OTHER_TASKS[2]:
        assert bytes(arrived[3][0][1][0]) == bytes(task[3][0][1][0])
    else:
        assert repr(arrived) == repr(task)  # (a partial's pickle is not the same after a trip)


def test_a_rebound_function_is_refused_as_pickle_does(sender):
    task_sender, reader = sender
    original = support.inc
    task_sender.put((1, 0, mpp.mapstar, ((original, (1,)),), {}))
    support.inc = support.fail_on
    try:
        with pytest.raises(pickle.PicklingError, match="not the same object"):
            task_sender.put((1, 1, mpp.mapstar, ((original, (2,)),), {}))
    finally:
        support.inc = original
    task_sender.put((1, 2, mpp.mapstar, ((original, (3,)),), {}))
    assert [pickle.loads(_received(reader))[1] for _ in range(2)] == [0, 2]


def test_an_unpicklable_chunk_raises_with_nothing_sent(sender):
    task_sender, reader = sender
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        task_sender.put((1, 0, mpp.mapstar, ((support.inc, (lambda: 0,)),), {}))
    task_sender.put((1, 1, mpp.mapstar, ((support.inc, (1,)),), {}))  # the pickler is reusable
    assert pickle.loads(_received(reader))[1] == 1
    assert not reader.poll(0)


def test_a_closed_task_queue_raises_as_connection_send(sender):
    task_sender, _ = sender
    task_sender._conn.close()
    with pytest.raises(OSError):
        task_sender.put((1, 0, mpp.mapstar, ((support.inc, (1,)),), {}))


def test_which_pools_get_the_fast_paths(flavor):
    with flavor.ctx.Pool(2) as pool:
        fast_put = isinstance(getattr(pool._quick_put, "__self__", None), _pool._TaskSender)
        sentinels = pool._get_sentinels()
        assert fast_put is (not flavor.is_stdlib)
        assert (pool._outqueue._reader in sentinels) is flavor.is_stdlib
        assert pool._change_notifier._reader in sentinels
        assert pool.starmap(divmod, [(7, 2), (9, 4)]) == [(3, 1), (2, 1)]
        assert pool.map(support.inc, range(100), chunksize=7) == list(range(1, 101))
        assert pool.apply_async(support.inc, (41,)).get(TIMEOUT) == 42
        assert pool.apply_async(support.inc, (), {"x": 1}).get(TIMEOUT) == 2
    pool.join()


def test_the_worker_handler_still_hears_what_it_waits_for(fork_flavor):
    # No longer woken by results: worker exits (their sentinels), close() and the cache
    # emptying (the change notifier) must still reach it.
    pool = fork_flavor.ctx.Pool(2, maxtasksperchild=3)
    try:
        pids = set(pool.map(support.pid_of, range(30), chunksize=1))
        assert len(pids) >= 6  # workers that exited were replaced
        result = pool.map_async(support.inc, range(50), chunksize=1)
        pool.close()
        assert result.get(TIMEOUT) == list(range(1, 51))
        pool.join()  # returns only once the worker handler saw the cache empty and the close
        assert all(not p.is_alive() for p in pool._pool)
    finally:
        pool.terminate()


def test_terminate_still_reaches_the_worker_handler(fork_flavor):
    # terminate() while tasks run: the worker handler hears it through the change notifier
    pool = fork_flavor.ctx.Pool(2)
    results = pool.imap_unordered(support.pid_of, range(400), chunksize=1)  # 10 ms each
    assert results.next(TIMEOUT) in {p.pid for p in pool._pool}  # tasks are flowing
    pool.terminate()
    pool.join()  # the watchdog bounds it
    assert not pool._worker_handler.is_alive()
    assert all(not p.is_alive() for p in pool._pool)


class _RaisesOnEquality:
    """A callable whose ``==`` raises: the sender never compares functions with it."""

    def __eq__(self, other):
        raise AssertionError("compared with ==")

    __hash__ = object.__hash__

    def __call__(self, x):
        return x


def test_functions_are_compared_by_identity(sender):
    task_sender, reader = sender
    task_sender.put((1, 0, mpp.mapstar, ((support.inc, (1,)),), {}))
    task_sender.put((1, 1, mpp.mapstar, ((_RaisesOnEquality(), (1,)),), {}))  # pickled by Connection.send
    assert [pickle.loads(_received(reader))[1] for _ in range(2)] == [0, 1]
