"""ProcessPoolExecutor's fast paths under hyperpipe (``_executor``): the coalescing wake-up
and the manager's wait answered without a system call. Both checked on their own and
through executors of every flavor."""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import os
import pickle
import threading
import types
from concurrent.futures import process as cfp

import pytest

import hyperpipe
from hyperpipe import _executor

import pool_support as support
from pool_support import TIMEOUT


def _pipe_bytes(wakeup: _executor.ExecutorWakeup) -> int:
    """How many bytes the wake-up pipe holds (drains them)."""
    try:
        return len(os.read(wakeup._reader.fileno(), 4096))
    except BlockingIOError:
        return 0


def _executor_for(flavor, workers=2):
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=flavor.ctx)


def test_wakeups_coalesce_until_cleared():
    wakeup = _executor.ExecutorWakeup()
    try:
        assert not wakeup._reader.pending
        for _ in range(1000):
            wakeup.wakeup()
        assert wakeup._reader.pending
        assert hyperpipe.wait([wakeup._reader], 0) == [wakeup._reader]
        wakeup.clear()
        assert not wakeup._reader.pending
        assert hyperpipe.wait([wakeup._reader], 0) == []
        wakeup.wakeup()
        wakeup.wakeup()
        assert _pipe_bytes(wakeup) == 1  # one byte for the two: the second found it pending
    finally:
        wakeup.close()
    wakeup.close()  # idempotent
    wakeup.wakeup()  # after close: nothing, as the stdlib's
    wakeup.clear()


def test_wakeup_closes_its_descriptors_when_dropped():
    wakeup = _executor.ExecutorWakeup()
    fd = wakeup._reader.fileno()
    os.fstat(fd)
    del wakeup
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_wakeup_racing_clear_is_never_lost():
    # A writer thread wakes, a "manager" waits on the descriptor and clears: every change
    # the writer announces is seen within a bounded wait.
    wakeup = _executor.ExecutorWakeup()
    seen = []
    changes = []
    stop = threading.Event()

    def writer():
        for i in range(2000):
            changes.append(i)
            wakeup.wakeup()
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while not (stop.is_set() and len(seen) == 2000):
            ready = hyperpipe.wait([wakeup._reader], 5.0)
            assert ready or len(seen) == len(changes), "a wake-up was lost"
            wakeup.clear()
            seen[:] = list(changes)  # the manager re-reads the state after clear()
    finally:
        thread.join(TIMEOUT)
        wakeup.close()
    assert seen == list(range(2000))


def test_a_wakeup_during_clear_leaves_flag_and_pipe_agreeing(monkeypatch):
    # Another thread wakes while clear() drains. Either way it goes (absorbed: the manager
    # re-reads the state after clear(); or kept for the next wait), "pending" must agree
    # with the pipe: a flag left set over an empty pipe would swallow every later wake-up.
    wakeup = _executor.ExecutorWakeup()
    pipe_type = type(wakeup._reader)
    drain = pipe_type.drain
    late = []

    def drain_while_another_thread_wakes(self):
        thread = threading.Thread(target=wakeup.wakeup)
        thread.start()
        thread.join(0.2)
        late.append(thread)
        drain(self)

    try:
        wakeup.wakeup()
        monkeypatch.setattr(pipe_type, "drain", drain_while_another_thread_wakes)
        wakeup.clear()
        monkeypatch.undo()
        late[0].join(TIMEOUT)
        assert wakeup._reader.pending == bool(_pipe_bytes(wakeup))
        wakeup._reader.pending = False
        wakeup.wakeup()
        assert hyperpipe.wait([wakeup._reader], 0) == [wakeup._reader]
    finally:
        wakeup.close()


def test_manager_wait_answers_from_the_ring():
    result_r, result_w = hyperpipe.Pipe(duplex=False)
    wakeup = _executor.ExecutorWakeup()
    sentinel_r, sentinel_w = os.pipe()
    objects = [result_r, wakeup._reader, sentinel_r]
    try:
        result_r.fileno()  # the manager's wait hands out the descriptor first
        assert _executor.ready_without_waiting(objects) is None  # nothing: a real wait
        wakeup.wakeup()
        assert _executor.ready_without_waiting(objects) == [wakeup._reader]
        result_w.send("result")
        os.write(sentinel_w, b"x")  # a ready sentinel is left for the next loop
        assert _executor.ready_without_waiting(objects) == [result_r, wakeup._reader]
        wakeup.clear()
        assert _executor.ready_without_waiting(objects) == [result_r]
        # Any other list takes the ordinary wait.
        assert _executor.ready_without_waiting([result_r, sentinel_r]) is None
        assert _executor.ready_without_waiting([sentinel_r, wakeup._reader]) is None
        # Through the patched multiprocessing.connection.wait too.
        hyperpipe.get_context()
        import multiprocessing.connection

        assert multiprocessing.connection.wait(objects, 0) == [result_r]
        assert result_r.recv() == "result"
        assert multiprocessing.connection.wait(objects, 0) == [sentinel_r]
    finally:
        for conn in (result_r, result_w):
            conn.close()
        os.close(sentinel_r)
        os.close(sentinel_w)
        wakeup.close()


def test_manager_wait_watches_the_ring_before_sleeping(monkeypatch):
    result_r, result_w = hyperpipe.Pipe(duplex=False)
    wakeup = _executor.ExecutorWakeup()
    objects = [result_r, wakeup._reader]
    sender = threading.Timer(0.05, result_w.send, ("late result",))
    try:
        result_r.fileno()
        monkeypatch.setattr(_executor, "RESULT_WATCH", TIMEOUT)
        sender.start()
        assert _executor.ready_without_waiting(objects) == [result_r]
        assert result_r.recv() == "late result"
        monkeypatch.setattr(_executor, "RESULT_WATCH", 0.001)
        assert _executor.ready_without_waiting(objects) is None  # then a real wait
    finally:
        sender.join(TIMEOUT)
        for conn in (result_r, result_w):
            conn.close()
        wakeup.close()


def test_only_hyperpipe_executors_get_the_fast_wakeup(flavor):
    with _executor_for(flavor) as ex:
        wakeup = ex._executor_manager_thread_wakeup
        assert ex._call_queue.thread_wakeup is wakeup
        assert isinstance(wakeup, cfp._ThreadWakeup)
        assert (type(wakeup) is _executor.ExecutorWakeup) == (not flavor.is_stdlib)
        assert ex.submit(support.inc, 1).result(TIMEOUT) == 2


def test_an_executor_never_used_leaves_no_descriptor(fork_flavor):
    # The suite's guard fails a test that leaks descriptors.
    ex = _executor_for(fork_flavor)
    ex.shutdown()
    del ex
    gc.collect()


def test_submitting_from_many_threads_while_results_flow(flavor):
    # Wake-ups from several threads race the manager's clear(): every future completes.
    with _executor_for(flavor) as ex:
        futures = []
        lock = threading.Lock()

        def submit_some(base):
            for i in range(base, base + 300):
                future = ex.submit(support.inc, i)
                with lock:
                    futures.append((i, future))

        threads = [threading.Thread(target=submit_some, args=(k * 1000,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert len(futures) == 1200
        for i, future in futures:
            assert future.result(TIMEOUT) == i + 1


def test_shutdown_cancels_queued_work(fork_flavor):
    with _executor_for(fork_flavor) as ex:
        futures = [ex.submit(support.inc, i) for i in range(2000)]
        ex.shutdown(wait=True, cancel_futures=True)
    done = [f for f in futures if not f.cancelled()]
    assert all(f.result(0) == i + 1 for i, f in enumerate(futures) if f in done)
    assert any(f.cancelled() for f in futures)


def test_an_executor_dropped_without_shutdown_ends_its_manager(fork_flavor):
    ex = _executor_for(fork_flavor)
    assert list(ex.map(support.inc, range(100))) == list(range(1, 101))
    manager = ex._executor_manager_thread
    processes = list(ex._processes.values())
    del ex  # the weakref callback wakes the manager, which shuts the pool down
    gc.collect()
    manager.join(TIMEOUT)
    assert not manager.is_alive()
    for p in processes:
        p.join(TIMEOUT)
        assert not p.is_alive()


# -- call items: the task's function pickled once ------------------------------------------


class Adder:
    """A callable with state: its pickle changes with it, so it is pickled with each task."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, x: int) -> int:
        return x + self.n


def test_which_functions_are_pickled_once():
    by_name = _executor._pickled_by_name
    assert by_name(support.inc) and by_name(len)
    assert by_name(functools.partial(cfp._process_chunk, support.inc))
    assert not by_name(functools.partial(support.inc, x=1))  # keywords: pickled each time
    assert not by_name(functools.partial(cfp._process_chunk, Adder(1)))
    assert not by_name(Adder(1)) and not by_name(Adder(1).__call__)
    assert _executor._pickled_fn(lambda x: x) is None  # unpicklable: the task fails as usual


def test_the_function_pickle_cache_is_bounded():
    partials = [functools.partial(cfp._process_chunk, support.inc, i) for i in range(3)]
    assert all(_executor._pickled_by_name(p) is False for p in partials)  # an int is data
    functions = [support.inc, support.fail_on, support.die, support.pid_of, len, abs, min, max, sum, any]
    for fn in functions:
        assert pickle.loads(_executor._pickled_fn(fn)) is fn
    assert len(_executor._pickled_fns) == _executor.FN_CACHE_SIZE
    assert _executor._pickled_fn(any) is _executor._pickled_fns[id(any)][1]  # a hit


def test_a_compact_call_item_arrives_as_the_stdlib_item():
    ctx = hyperpipe.get_context("fork")
    q = ctx.Queue()
    q.put = types.MethodType(_executor._put_call_item, q)
    fn = functools.partial(cfp._process_chunk, support.inc)
    try:
        q.put(cfp._CallItem(7, fn, (((41,),),), {}))
        item = q.get(timeout=TIMEOUT)
        assert type(item) is cfp._CallItem
        assert (item.work_id, item.args, item.kwargs) == (7, (((41,),),), {})
        assert item.fn.func is cfp._process_chunk and item.fn.args == (support.inc,)
        assert item.fn(*item.args, **item.kwargs) == [42]
        adder = Adder(1)
        q.put(cfp._CallItem(8, adder, (1,), {}))
        adder.n = 100
        q.put(cfp._CallItem(9, adder, (1,), {}))
        assert [q.get(timeout=TIMEOUT).fn(1) for _ in range(2)] == [2, 101]
        q.put(None)
        assert q.get(timeout=TIMEOUT) is None
    finally:
        q.close()
        q.join_thread()


def test_callables_with_state_travel_with_their_current_state(fork_flavor):
    adder = Adder(1)
    with _executor_for(fork_flavor) as ex:
        assert ex.submit(adder, 1).result(TIMEOUT) == 2
        adder.n = 10
        assert ex.submit(adder, 1).result(TIMEOUT) == 11
        assert list(ex.map(adder, range(5))) == [10, 11, 12, 13, 14]
        adder.n = 20
        assert list(ex.map(adder, range(5))) == [20, 21, 22, 23, 24]


def test_manager_wait_on_a_closed_result_reader_says_ready():
    # The manager then calls recv(), which raises: it marks the pool broken, as with the
    # stdlib's reader.
    result_r, result_w = hyperpipe.Pipe(duplex=False)
    wakeup = _executor.ExecutorWakeup()
    result_r.close()
    try:
        assert _executor.ready_without_waiting([result_r, wakeup._reader]) == [result_r]
    finally:
        result_w.close()
        wakeup.close()


def test_a_rebound_function_fails_as_with_the_stdlib(fork_flavor):
    # Pickled once, then its module attribute rebound: pickle's own check ("not the same
    # object") must still refuse it, as it does for the stdlib's executor.
    original = support.inc
    with _executor_for(fork_flavor) as ex:
        assert ex.submit(original, 1).result(TIMEOUT) == 2
        support.inc = support.fail_on
        try:
            with pytest.raises(pickle.PicklingError):
                ex.submit(original, 1).result(TIMEOUT)
        finally:
            support.inc = original
        assert ex.submit(original, 1).result(TIMEOUT) == 2


def test_a_builtin_bound_to_an_object_is_pickled_with_each_task():
    items: list = []
    assert not _executor._pickled_by_name(items.append)  # its pickle holds the list
    assert _executor._pickled_by_name(len) and _executor._pickled_by_name(support.inc)
