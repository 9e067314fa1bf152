"""Queue, JoinableQueue and SimpleQueue: one behaviour suite for the standard library,
``hyperpipe.get_context()`` and ``hyperpipe.install()``, under every start method."""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import multiprocessing.reduction
import os
import signal
import threading
import time

import pytest

import hyperpipe
from hyperpipe import _queues

from pool_support import TIMEOUT, Empty, Full
import pool_support as support


def _gather(results, nproc):
    return [results.get(timeout=TIMEOUT) for _ in range(nproc)]


def _check_order(reports, producers, count):
    """Every item arrived exactly once and each consumer saw each producer's items in order."""
    everything = sorted(item for _, seen in reports for item in seen)
    assert everything == sorted((tag, i) for tag in range(producers) for i in range(count))
    for _, seen in reports:
        for tag in range(producers):
            mine = [i for t, i in seen if t == tag]
            assert mine == sorted(mine), f"producer {tag}'s items out of order"


def test_child_puts_parent_gets_in_order(flavor, procs):
    q = flavor.ctx.Queue()
    flavor.check_queue(q)
    procs.start(flavor.ctx, support.produce, q, 0, 1000)
    got = [q.get(timeout=TIMEOUT) for _ in range(1000)]
    assert [(t, i) for t, i, _ in got] == [(0, i) for i in range(1000)]
    procs.join_all()
    q.close()
    q.join_thread()


def _child_returns_right_after_feeding_a_full_ring(flavor, procs, q, timeout=TIMEOUT):
    # 1,000 items of 2 KiB fill a 256 KiB ring many times over: the child's feeder thread
    # still holds most of them when the child returns, and flushes them at exit.
    p = procs.start(flavor.ctx, support.produce, q, 0, 1000, 2048)
    try:
        got = [q.get(timeout=timeout) for _ in range(1000)]
    finally:
        q.close()
        p.join(timeout)
        p.kill()  # a child whose feeder lost its pipe may never end
    assert [(t, i) for t, i, _ in got] == [(0, i) for i in range(1000)]
    assert p.exitcode == 0


def test_child_returns_right_after_feeding_a_full_ring(flavor, procs):
    _child_returns_right_after_feeding_a_full_ring(flavor, procs, flavor.ctx.Queue())


def test_stdlib_feeder_over_hyperpipe_flushes_at_exit(fork_flavor, procs):
    # A subclass with its own _feed (as loky's) keeps the stdlib's item path and exit order.
    q = support.OwnFeederQueue(ctx=fork_flavor.ctx)
    fork_flavor.check_queue(q)
    _child_returns_right_after_feeding_a_full_ring(fork_flavor, procs, q, timeout=3)


def test_many_producers_many_consumers(flavor, procs):
    producers, consumers, count = 3, 3, 200
    q = flavor.ctx.Queue()
    results = flavor.ctx.Queue()
    for tag in range(producers):
        procs.start(flavor.ctx, support.produce, q, tag, count, 100)
    for _ in range(consumers):
        procs.start(flavor.ctx, support.consume_until_none, q, results)
    stop = flavor.ctx.Event()
    procs.start(flavor.ctx, support.poll_empty, q, stop)  # empty() takes no lock
    # the consumers stop at one None each, once every producer is done
    for p in procs.processes[:producers]:
        p.join(TIMEOUT)
        assert p.exitcode == 0
    for _ in range(consumers):
        q.put(None)
    reports = _gather(results, consumers)
    stop.set()
    _check_order(reports, producers, count)


def test_empty_maxsize_full_and_timeouts(fork_flavor):
    q = fork_flavor.ctx.Queue(maxsize=2)
    fork_flavor.check_queue(q)
    assert q.empty() and not q.full() and q.qsize() == 0
    with pytest.raises(Empty):
        q.get_nowait()
    started = time.monotonic()
    with pytest.raises(Empty):
        q.get(timeout=0.1)
    assert time.monotonic() - started >= 0.09
    q.put(1)
    q.put_nowait(2)
    assert q.full() and q.qsize() == 2
    with pytest.raises(Full):
        q.put_nowait(3)
    with pytest.raises(Full):
        q.put(3, timeout=0.05)
    assert q.get(timeout=TIMEOUT) == 1
    assert q.get(block=False) == 2 or q.get(timeout=TIMEOUT) == 2
    assert q.qsize() == 0
    q.close()
    q.join_thread()
    with pytest.raises(ValueError, match="is closed"):
        q.put(4)
    with pytest.raises(ValueError, match="is closed"):
        q.get()


def test_put_nowait_from_a_second_thread_keeps_order(fork_flavor):
    q = fork_flavor.ctx.Queue()
    items = [("a", i, b"") for i in range(300)]
    thread = threading.Thread(target=lambda: [q.put(x) for x in items])
    thread.start()
    got = [q.get(timeout=TIMEOUT) for _ in items]
    thread.join(TIMEOUT)
    assert got == items
    q.close()
    q.join_thread()


def test_unpicklable_item_is_dropped_and_the_queue_goes_on(fork_flavor, capsys):
    # The standard library's feeder prints the error and counts the item as gone.
    q = fork_flavor.ctx.Queue(maxsize=1)
    q.put(support.unpicklable())
    q.put("next", timeout=TIMEOUT)  # the place of the dropped item was given back
    assert q.get(timeout=TIMEOUT) == "next"
    q.close()
    q.join_thread()
    assert "pickle" in capsys.readouterr().err.lower()


def test_big_items_in_order_through_a_full_ring(fork_flavor):
    # Items larger than the ring and more than fit: the feeder takes over and keeps order.
    q = fork_flavor.ctx.Queue()
    sizes = [10, 300_000, 10, 100_000, 5, 70_000] * 5
    for i, n in enumerate(sizes):
        q.put((i, bytes([i]) * n))
    for i, n in enumerate(sizes):
        assert q.get(timeout=TIMEOUT) == (i, bytes([i]) * n)
    q.close()
    q.join_thread()


def test_numpy_arrays_arrive_whole(fork_flavor, procs):
    np = pytest.importorskip("numpy")
    q = fork_flavor.ctx.Queue()
    back = fork_flavor.ctx.Queue()
    procs.start(fork_flavor.ctx, support.echo_queue, q, back)
    arrays = [np.arange(n, dtype=np.float64) for n in (10, 9000, 300_000)]
    for a in arrays:
        q.put(a)
    q.put(None)
    for a in arrays:
        got = back.get(timeout=TIMEOUT)
        assert got.dtype == a.dtype and np.array_equal(got, a)
        got[:1] = -1  # a private, writable array, as the stdlib gives
    q.close()
    q.join_thread()


def test_joinable_queue_task_done_and_join(fork_flavor, procs):
    q = fork_flavor.ctx.JoinableQueue()
    fork_flavor.check_queue(q)
    for i in range(20):
        q.put(i)
    procs.start(fork_flavor.ctx, support.join_consumer, q, 20)
    done = threading.Event()
    joiner = threading.Thread(target=lambda: (q.join(), done.set()), daemon=True)
    joiner.start()
    assert done.wait(TIMEOUT), "join() did not return after 20 task_done()"
    with pytest.raises(ValueError, match="too many"):
        q.task_done()
    q.close()
    q.join_thread()


def test_simple_queue_round_trip(flavor, procs):
    inq, outq = flavor.ctx.SimpleQueue(), flavor.ctx.SimpleQueue()
    flavor.check_queue(inq)
    procs.start(flavor.ctx, support.echo_simple, inq, outq)
    items = [b"", 0, "x" * 100_000, list(range(100)), {"k": (1, 2)}]
    assert outq.empty()
    for item in items:
        inq.put(item)
    assert [outq.get() for _ in items] == items
    inq.put(None)
    procs.join_all()
    assert outq.empty()
    for q in (inq, outq):
        q.close()


def test_a_queue_arriving_in_a_child_takes_the_native_path(flavor, procs):
    q = flavor.ctx.Queue()
    results = flavor.ctx.Queue()
    procs.start(flavor.ctx, support.report_native, q, results)
    # fork children inherit the parent's patched classes; spawn and forkserver children
    # patch themselves when a hyperpipe queue arrives
    assert results.get(timeout=TIMEOUT) == (not flavor.is_stdlib)


def test_cancel_join_thread_lets_a_child_exit_with_items_unsent(fork_flavor, procs):
    # Nobody reads: 100 items of 10 kB do not fit in a pipe or a ring, and without
    # cancel_join_thread() the child would wait at exit for its feeder forever.
    q = fork_flavor.ctx.Queue()
    p = procs.start(fork_flavor.ctx, support.fill_and_leave, q, 100, 10_000)
    p.join(TIMEOUT)
    assert p.exitcode == 0


@pytest.mark.deliberate_difference("put() sends at once while the ring has room (the stdlib's "
                                   "feeder thread sends later): a producer killed after put() "
                                   "returned has delivered the item")
def test_an_item_put_is_delivered_even_if_the_producer_dies_next(fork_flavor, procs):
    q = fork_flavor.ctx.Queue()
    ready = fork_flavor.ctx.Event()
    p = procs.start(fork_flavor.ctx, support.put_then_wait, q, ready)
    assert ready.wait(TIMEOUT)
    p.kill()
    p.join(TIMEOUT)
    assert q.get(timeout=TIMEOUT) == "item"


class _OnlyForkingPickles:
    """Pickles only through ``ForkingPickler``'s own reducers (as connections and sockets do)."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        raise TypeError("only ForkingPickler's reducer pickles this")


def _rebuild_only_forking_pickles(value):
    return _OnlyForkingPickles(value)


multiprocessing.reduction.ForkingPickler.register(
    _OnlyForkingPickles, lambda obj: (_rebuild_only_forking_pickles, (obj.value,)))


def test_items_are_pickled_with_the_forking_picklers_reducers(fork_flavor):
    # put() pickles on its own (not through Connection.send): it must still use the
    # reducers multiprocessing registers (connections, sockets), as the stdlib's feeder does.
    q = fork_flavor.ctx.Queue()
    for i in range(3):
        q.put((i, _OnlyForkingPickles(i)))
    got = [q.get(timeout=TIMEOUT) for _ in range(3)]
    assert [(i, item.value) for i, item in got] == [(i, i) for i in range(3)]
    q.close()
    q.join_thread()


def test_a_queue_over_the_socket_transport_keeps_the_semantics(procs):
    # Queues over shared memory send straight to the transport; any other hyperpipe
    # transport goes through Connection.send/recv: both keep order, timeouts and Empty.
    ctx = hyperpipe.get_context("fork")
    q = ctx.Queue(maxsize=3)
    q._reader.close()
    q._writer.close()
    q._reader, q._writer = hyperpipe.Pipe(duplex=False, transport="socket")
    q._poll = q._reader.poll
    assert q._writer.transport == "socket"
    with pytest.raises(Empty):
        q.get(timeout=0.05)
    with pytest.raises(Empty):
        q.get_nowait()
    procs.start(ctx, support.produce, q, 0, 200, 100)
    got = [q.get(timeout=TIMEOUT) for _ in range(200)]
    assert [(t, i) for t, i, _ in got] == [(0, i) for i in range(200)]
    assert _queues._mode(q) == _queues.NATIVE
    procs.join_all()
    q.close()
    q.join_thread()


def test_an_unpicklable_item_among_the_feeders_batch_is_dropped_alone(fork_flavor, capsys):
    # Nobody reads until every put returned: the ring fills and the rest waits in the feeder,
    # which sends it in batches; the bad item's error is reported and the others arrive in order.
    q = fork_flavor.ctx.Queue()
    items = [(i, bytes([i % 251]) * 2048) for i in range(300)]  # 600 KiB: over twice the ring
    for i, item in enumerate(items):
        q.put(support.unpicklable() if i == 250 else item)
    del items[250]
    assert [q.get(timeout=TIMEOUT) for _ in items] == items
    assert q.empty()
    assert q.qsize() == 0  # the dropped item's place was given back
    q.close()
    q.join_thread()
    assert "pickle" in capsys.readouterr().err.lower()


def test_put_hands_the_item_to_the_feeder_while_another_holds_the_write_lock(fork_flavor):
    # Another process sending (here: this test holding the lock) must not block put():
    # the item waits in the feeder and goes out, in order, once the lock is free.
    q = fork_flavor.ctx.Queue()
    q.put("first")
    assert q.get(timeout=TIMEOUT) == "first"
    assert q._wlock.acquire(timeout=TIMEOUT)
    try:
        started = time.monotonic()
        q.put("second")
        q.put("third")
        assert time.monotonic() - started < 1.0
        with pytest.raises(Empty):
            q.get(timeout=0.05)
    finally:
        q._wlock.release()
    assert [q.get(timeout=TIMEOUT) for _ in range(2)] == ["second", "third"]
    q.close()
    q.join_thread()


def test_a_contended_queue_lock_is_taken_after_yields_or_by_waiting():
    lock = multiprocessing.get_context("fork").Lock()  # what a queue's locks are
    assert lock.acquire(False)
    started = time.monotonic()
    assert not _queues._acquire_contended(lock, 0.05)  # still held: gives up at the timeout
    assert 0.04 <= time.monotonic() - started < 5.0
    releaser = threading.Timer(0.05, lock.release)  # freed while it sleeps on it
    releaser.start()
    assert _queues._acquire_contended(lock, TIMEOUT)
    releaser.join(TIMEOUT)
    lock.release()
    assert lock.acquire(False)  # and released again: it was taken once
    lock.release()


def _fail_to_unpickle():
    raise RuntimeError("this item does not unpickle")


class _FailsToUnpickle:
    def __reduce__(self):
        return (_fail_to_unpickle, ())


def test_an_item_that_fails_to_unpickle_is_gone_and_the_queue_goes_on(fork_flavor):
    q = fork_flavor.ctx.Queue(maxsize=2)
    q.put(_FailsToUnpickle())
    q.put("next")
    with pytest.raises(RuntimeError, match="does not unpickle"):
        q.get(timeout=TIMEOUT)
    assert q.get(timeout=TIMEOUT) == "next"
    q.put_nowait(1)  # both places were given back
    q.put_nowait(2)
    assert [q.get(timeout=TIMEOUT) for _ in range(2)] == [1, 2]
    q.close()
    q.join_thread()


def test_simple_queue_items_of_every_kind_and_failures(fork_flavor):
    # SimpleQueue (Pool's queues) pickles straight to the transport and unpickles after its
    # read lock, as Queue does: big arrays out of band, the ForkingPickler's reducers, an
    # unpicklable item refused with nothing sent, one that fails to unpickle gone alone.
    q = fork_flavor.ctx.SimpleQueue()
    fork_flavor.check_queue(q)
    with pytest.raises(Exception, match="pickle"):
        q.put(lambda: None)
    q.put(_FailsToUnpickle())
    q.put((1, _OnlyForkingPickles(7)))
    with pytest.raises(RuntimeError, match="does not unpickle"):
        q.get()
    first, item = q.get()
    assert (first, item.value) == (1, 7)
    np = pytest.importorskip("numpy")
    array = np.arange(300_000, dtype=np.float64)
    putter = threading.Thread(target=q.put, args=({"a": array},))  # the stdlib's pipe holds 64 KiB
    putter.start()
    got = q.get()["a"]
    putter.join(TIMEOUT)
    assert np.array_equal(got, array)
    got[:1] = -1  # private and writable, as the stdlib's
    assert q.empty()
    q.close()


def test_a_simple_queue_over_the_socket_transport(procs):
    ctx = hyperpipe.get_context("fork")
    inq, outq = ctx.SimpleQueue(), ctx.SimpleQueue()
    for q in (inq, outq):
        q._reader.close()
        q._writer.close()
        q._reader, q._writer = hyperpipe.Pipe(duplex=False, transport="socket")
        q._poll = q._reader.poll
    procs.start(ctx, support.echo_simple, inq, outq)
    items = [b"", 0, "x" * 100_000, list(range(100))]
    for item in items:
        inq.put(item)
    assert [outq.get() for _ in items] == items
    assert _queues._simple_mode(outq) == _queues.NATIVE
    inq.put(None)
    procs.join_all()
