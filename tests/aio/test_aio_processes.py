"""An asynchronous parent with synchronous worker processes: the usual shape of a service.

Every child is started through the suite's ``procs`` fixture (joined with a timeout, killed if
still alive), every await that depends on a child is bounded by ``asyncio.timeout``, and the
fixture is named ``impl`` so that the suite's guard applies (watchdog, fd-leak check).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading

import pytest

import helpers
from impls import make_impl

import hyperpipe
from hyperpipe.asyncio import AsyncConnection

from aio_support import LOOPS, STEP, loop_factory_for, run, timeout



@pytest.fixture(params=["hyperpipe-socket", "hyperpipe-shm"])
def impl(request):
    return make_impl(request.param)


@pytest.fixture(params=LOOPS)
def loop_factory(request):
    return loop_factory_for(request.param)


# -- child targets (module level: importable by spawn children) ---------------------------


def child_worker(conn):
    """A synchronous worker: answers ("square", n) until None or EOF; echoes bytes."""
    while conn.poll(helpers.CHILD_TIMEOUT):
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        kind, value = request
        if kind == "square":
            conn.send(value * value)
        elif kind == "bytes":
            conn.send_bytes(value[::-1])
        elif kind == "pid":
            conn.send(os.getpid())


def child_ready_then_sleep(conn, seconds):
    """Say hello, then sleep (the test kills us while the parent awaits a reply)."""
    conn.send("ready")
    threading.Event().wait(seconds)


def child_ready_then_send_forever(conn, seconds):
    """Say hello, then stream big messages until killed (or ``seconds`` pass)."""
    conn.send("ready")
    block = helpers.pattern(4 << 20)
    deadline = threading.Event()
    threading.Timer(seconds, deadline.set).start()
    while not deadline.is_set():
        conn.send_bytes(block)


def child_serve_many(conns):
    """One worker process holding several connections, one thread each."""
    threads = [threading.Thread(target=child_worker, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(helpers.CHILD_TIMEOUT)


# -- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_async_parent_sync_child_round_trips(impl, loop_factory, procs, method):
    ours, theirs = impl.Pipe()
    proc = procs.start(multiprocessing.get_context(method), child_worker, theirs)
    theirs.close()

    async def main():
        async with AsyncConnection(ours) as aconn, timeout(STEP * 2):
            squares = []
            for n in range(200):
                await aconn.send(("square", n))
                squares.append(await aconn.recv())
            big = helpers.pattern(3 << 20)
            await aconn.send(("bytes", big))
            reversed_big = await aconn.recv_bytes()
            await aconn.send(("pid", None))
            pid = await aconn.recv()
            await aconn.send(None)
            return squares, reversed_big == big[::-1], pid

    squares, big_ok, pid = run(loop_factory, main())
    assert squares == [n * n for n in range(200)]
    assert big_ok
    assert pid == proc.pid
    proc.join(STEP)
    assert proc.exitcode == 0


def test_peer_killed_while_awaiting_recv_raises_eoferror(impl, loop_factory, procs):
    ours, theirs = impl.Pipe()
    proc = procs.start(multiprocessing.get_context("fork"), child_ready_then_sleep, theirs, 60.0)
    theirs.close()

    async def main():
        async with AsyncConnection(ours) as aconn:
            async with timeout(STEP):
                assert await aconn.recv() == "ready"
            waiting = asyncio.ensure_future(aconn.recv())
            await asyncio.sleep(0.05)
            assert not waiting.done()
            os.kill(proc.pid, signal.SIGKILL)
            with pytest.raises(EOFError):
                async with timeout(STEP):
                    await waiting

    run(loop_factory, main())


def test_peer_killed_while_streaming_ends_with_eof_or_protocol_error(impl, loop_factory, procs):
    ours, theirs = impl.Pipe()
    proc = procs.start(
        multiprocessing.get_context("fork"), child_ready_then_send_forever, theirs, 60.0
    )
    theirs.close()

    async def main():
        async with AsyncConnection(ours) as aconn:
            async with timeout(STEP):
                assert await aconn.recv() == "ready"
                for _ in range(3):
                    assert len(await aconn.recv_bytes()) == 4 << 20
            os.kill(proc.pid, signal.SIGKILL)
            received = 0
            async with timeout(STEP):
                while True:
                    try:
                        data = await aconn.recv_bytes()
                    except EOFError:
                        return "eof", received
                    except hyperpipe.ProtocolError:
                        return "cut", received  # killed in the middle of a frame
                    assert data == helpers.pattern(4 << 20)
                    received += 1

    outcome, _ = run(loop_factory, main())
    assert outcome in ("eof", "cut")


def test_sending_to_a_dead_peer_raises_brokenpipeerror(impl, loop_factory, procs):
    ours, theirs = impl.Pipe()
    proc = procs.start(multiprocessing.get_context("fork"), child_ready_then_sleep, theirs, 60.0)
    theirs.close()

    async def main():
        async with AsyncConnection(ours) as aconn:
            async with timeout(STEP):
                assert await aconn.recv() == "ready"
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(STEP)
            with pytest.raises(BrokenPipeError):
                async with timeout(STEP):
                    for _ in range(10_000):  # the first ones may still fit in a buffer
                        await aconn.send_bytes(b"x" * 65536)

    run(loop_factory, main())


def test_one_loop_serves_fifty_connections_to_worker_processes(impl, loop_factory, procs):
    """5 worker processes x 10 connections each, all awaited by one loop at once."""
    ctx = multiprocessing.get_context("fork")
    ours = []
    for _ in range(5):
        pairs = [impl.Pipe() for _ in range(10)]
        procs.start(ctx, child_serve_many, [theirs for _, theirs in pairs])
        for mine, theirs in pairs:
            theirs.close()
            ours.append(AsyncConnection(mine))

    async def conversation(k, aconn):
        results = []
        for i in range(30):
            await aconn.send(("square", k * 1000 + i))
            results.append(await aconn.recv())
        await aconn.send(None)
        return results

    async def main():
        async with timeout(STEP * 2):
            return await asyncio.gather(*(conversation(k, c) for k, c in enumerate(ours)))

    try:
        results = run(loop_factory, main())
    finally:
        for aconn in ours:
            aconn.close()
    assert results == [[(k * 1000 + i) ** 2 for i in range(30)] for k in range(50)]
