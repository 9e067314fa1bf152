"""The behaviour suite's in-process cases, awaited: ``hyperpipe.asyncio.AsyncConnection``.

Parametrised over every hyperpipe transport (a missing one is skipped with the reason) and
over the event loops (asyncio, and uvloop when it is installed). The fixture is named
``impl`` so that the suite's guard (tests/conftest.py) applies: a SIGALRM watchdog, child
reaping and a file-descriptor leak check.
"""

from __future__ import annotations

import array
import asyncio
import pickle
import select
import socket
import struct
import threading
import time

import pytest

import helpers
from impls import make_impl

import hyperpipe
from hyperpipe.asyncio import AsyncConnection, open_pipe

from aio_support import LOOPS, STEP, loop_factory_for, timeout
from aio_support import run as run_on



@pytest.fixture(params=["hyperpipe-socket", "hyperpipe-shm"])
def impl(request):
    return make_impl(request.param)


@pytest.fixture(params=LOOPS)
def run(request):
    """``run(coroutine_function, *args)`` on a fresh loop of the requested kind."""
    factory = loop_factory_for(request.param)
    return lambda fn, *args: run_on(factory, fn(*args))


@pytest.fixture(params=["duplex", "oneway"])
def ends(request, impl):
    """(receiving AsyncConnection, sending AsyncConnection)."""
    if request.param == "duplex":
        a, b = impl.Pipe()
    else:
        a, b = impl.Pipe(duplex=False)
    rx, tx = AsyncConnection(a), AsyncConnection(b)
    yield rx, tx
    rx.close()
    tx.close()


@pytest.fixture
def duplex(impl):
    a, b = impl.Pipe()
    pair = AsyncConnection(a), AsyncConnection(b)
    yield pair
    pair[0].close()
    pair[1].close()


OBJECTS = [
    None,
    0,
    -(2**70),
    3.5,
    "text é",
    b"",
    b"bytes",
    bytearray(b"ba"),
    (1, (2, [3])),
    {"k": [1, 2], 3: {4}},
    list(range(1000)),
]


# -- sending and receiving ----------------------------------------------------------------


def test_send_recv_objects_in_order(run, ends):
    rx, tx = ends

    async def main():
        for obj in OBJECTS:
            await tx.send(obj)
        return [await rx.recv() for _ in OBJECTS]

    assert run(main) == OBJECTS


def test_big_objects_and_bytes_cross_while_both_sides_await(run, ends):
    rx, tx = ends
    big = helpers.pattern(8 << 20)

    async def main():
        receiver = asyncio.ensure_future(
            asyncio.gather(rx.recv(), rx.recv_bytes(), rx.recv())
        )
        await tx.send(big)
        await tx.send_bytes(big, 5, 1 << 20)
        await tx.send(("after", 1))
        return await asyncio.wait_for(receiver, STEP)

    got_obj, got_bytes, after = run(main)
    assert got_obj == big
    assert got_bytes == big[5 : 5 + (1 << 20)]
    assert after == ("after", 1)


def test_send_bytes_offset_size_and_any_buffer(run, duplex):
    a, b = duplex

    async def main():
        await a.send_bytes(b"0123456789", 2, 3)
        await a.send_bytes(array.array("i", [1, 2]))
        await a.send_bytes(memoryview(b"abcdef")[1:4])
        return [await b.recv_bytes() for _ in range(3)]

    assert run(main) == [b"234", array.array("i", [1, 2]).tobytes(), b"bcd"]


def test_send_bytes_bad_offset_raises_valueerror_and_sends_nothing(run, duplex):
    a, b = duplex

    async def main():
        with pytest.raises(ValueError):
            await a.send_bytes(b"abc", 4)
        await a.send_bytes(b"ok")
        return await b.recv_bytes()

    assert run(main) == b"ok"


def test_recv_bytes_into_with_offset_and_buffertooshort(run, duplex):
    a, b = duplex

    async def main():
        buf = bytearray(10)
        await a.send_bytes(b"hello")
        size = await b.recv_bytes_into(buf, 3)
        assert (size, bytes(buf)) == (5, b"\0\0\0hello\0\0")
        into = array.array("i", [0, 0, 0])
        await a.send_bytes(array.array("i", [7, 8]))
        assert await b.recv_bytes_into(into, 4) == 8
        assert into.tolist() == [0, 7, 8]
        await a.send_bytes(b"x" * 20)
        await a.send_bytes(b"next")
        with pytest.raises(hyperpipe.BufferTooShort) as info:
            await b.recv_bytes_into(bytearray(4))
        assert info.value.args[0] == b"x" * 20
        return await b.recv_bytes()

    assert run(main) == b"next"


def test_recv_bytes_over_maxlength_raises_oserror(run, duplex):
    a, b = duplex

    async def main():
        await a.send_bytes(b"x" * 100)
        with pytest.raises(OSError):
            await b.recv_bytes(10)

    run(main)


def test_message_that_fails_to_unpickle_raises_and_the_next_one_arrives(run, duplex):
    a, b = duplex

    async def main():
        await a.send(helpers.FailsToUnpickle())
        await a.send("next")
        with pytest.raises(ValueError, match="boom"):
            await b.recv()
        return await b.recv()

    assert run(main) == "next"


def test_unpicklable_object_raises_in_send_and_sends_nothing(run, duplex):
    a, b = duplex

    async def main():
        with pytest.raises(helpers.UnpicklableError):
            await a.send(helpers.FailsToPickle())
        await a.send("clean")
        return await b.recv()

    assert run(main) == "clean"


def test_batch_methods(run, duplex):
    a, b = duplex

    async def main():
        await a.send_bytes_many([b"1", b"22", b"333"])
        got = []
        while len(got) < 3:
            got += await b.recv_bytes_many()
        return got

    assert run(main) == [b"1", b"22", b"333"]


# -- iteration, context manager, EOF, broken pipe -----------------------------------------


def test_async_for_ends_at_eof(run, ends):
    rx, tx = ends

    async def main():
        for i in range(5):
            await tx.send(i)
        tx.close()
        return [m async for m in rx]

    assert run(main) == [0, 1, 2, 3, 4]


def test_async_with_returns_self_and_closes(run, impl):
    a, b = impl.Pipe()

    async def main():
        async with AsyncConnection(a) as aa, AsyncConnection(b) as bb:
            await aa.send("in")
            assert await bb.recv() == "in"
        return aa, bb

    aa, bb = run(main)
    assert aa.closed and bb.closed and a.closed and b.closed


def test_eof_after_peer_closed_and_data_read(run, ends):
    rx, tx = ends

    async def main():
        await tx.send("last")
        tx.close()
        assert await rx.recv() == "last"
        with pytest.raises(EOFError):
            await rx.recv()
        with pytest.raises(EOFError):
            await rx.recv_bytes()
        assert await rx.poll() is True  # EOF counts as ready, as in the stdlib

    run(main)


def test_eof_wakes_a_waiting_recv(run, ends):
    rx, tx = ends

    async def main():
        waiting = asyncio.ensure_future(rx.recv())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        tx.close()
        with pytest.raises(EOFError):
            await asyncio.wait_for(waiting, STEP)

    run(main)


@pytest.mark.parametrize("call", ["send", "send_bytes"])
def test_sending_to_a_closed_peer_raises_brokenpipeerror(run, ends, call):
    rx, tx = ends

    async def main():
        rx.close()
        with pytest.raises(BrokenPipeError):
            for _ in range(1000):  # the first sends may still fit in a buffer
                if call == "send":
                    await asyncio.wait_for(tx.send(b"x" * 65536), STEP)
                else:
                    await asyncio.wait_for(tx.send_bytes(b"x" * 65536), STEP)

    run(main)


def test_closed_connection_raises_oserror(run, duplex):
    a, b = duplex

    async def main():
        a.close()
        a.close()  # idempotent
        for call in (a.recv, a.recv_bytes, lambda: a.send(1), lambda: a.send_bytes(b"1")):
            with pytest.raises(OSError):
                await call()

    run(main)


def test_wrong_direction_raises_oserror(run, impl):
    reader, writer = impl.Pipe(duplex=False)

    async def main():
        async with AsyncConnection(reader) as r, AsyncConnection(writer) as w:
            with pytest.raises(OSError):
                await r.send(1)
            with pytest.raises(OSError):
                await w.recv()

    run(main)


def test_close_from_another_task_wakes_a_waiting_recv(run, duplex):
    a, b = duplex

    async def main():
        waiting = asyncio.ensure_future(b.recv())
        await asyncio.sleep(0.01)
        b.close()
        with pytest.raises(OSError):
            await asyncio.wait_for(waiting, STEP)

    run(main)


def test_needs_a_hyperpipe_connection():
    with socket.socket() as sock, pytest.raises(TypeError):
        AsyncConnection(sock)  # type: ignore[arg-type]


# -- timeouts and readiness ---------------------------------------------------------------


def test_asyncio_timeout_on_recv_loses_nothing(run, duplex):
    a, b = duplex

    async def main():
        with pytest.raises(TimeoutError):
            async with timeout(0.05):
                await b.recv()
        await a.send("after the timeout")
        async with timeout(STEP):
            return await b.recv()

    assert run(main) == "after the timeout"


def test_timeout_keyword_raises_hyperpipe_timeouterror(run, duplex):
    a, b = duplex

    async def main():
        start = time.monotonic()
        with pytest.raises(hyperpipe.TimeoutError):
            await b.recv(timeout=0.1)
        waited = time.monotonic() - start
        with pytest.raises(TimeoutError):
            await b.recv_bytes(timeout=0)
        with pytest.raises(ValueError):
            await b.recv(timeout=float("nan"))
        await a.send(1)
        return waited, await b.recv(timeout=STEP)

    waited, value = run(main)
    assert waited >= 0.1 - helpers.CLOCK_RES
    assert value == 1


def test_timeout_in_the_middle_of_a_frame_keeps_it_whole(run):
    """A frame's first half arrives, the receive times out, the rest arrives: one message."""
    raw, theirs = socket.socketpair()
    conn = AsyncConnection(hyperpipe.Connection(theirs.detach()))
    payload = pickle.dumps(helpers.pattern(100_000))
    frame = struct.pack("!i", len(payload)) + payload

    async def main():
        raw.sendall(frame[:50_000])
        with pytest.raises(TimeoutError):
            async with timeout(0.05):
                await conn.recv()
        raw.sendall(frame[50_000:])
        async with timeout(STEP):
            return await conn.recv()

    try:
        assert run(main) == helpers.pattern(100_000)
    finally:
        conn.close()
        raw.close()


def test_poll_waits_and_reports(run, ends):
    rx, tx = ends

    async def main():
        assert await rx.poll() is False
        assert await rx.poll(0.05) is False
        later = asyncio.get_running_loop().call_later(0.02, lambda: tx.connection.send("x"))
        assert await rx.poll(STEP) is True
        later.cancel()
        assert await rx.recv() == "x"

    run(main)


def test_the_loop_keeps_running_while_a_recv_waits(run, ends):
    """A thread sends after the loop has ticked: the wait did not block the loop."""
    rx, tx = ends
    ticks = 0

    async def main():
        nonlocal ticks

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                if ticks == 20:
                    threading.Thread(target=tx.connection.send, args=("go",), daemon=True).start()
                await asyncio.sleep(0.001)

        task = asyncio.ensure_future(ticker())
        try:
            return await asyncio.wait_for(rx.recv(), STEP)
        finally:
            task.cancel()

    assert run(main) == "go"
    assert ticks >= 20


def test_a_waiting_recv_does_not_spin(run, duplex):
    """Half a second of waiting costs far less than half a second of CPU."""
    a, b = duplex

    async def main():
        cpu = time.process_time()
        with pytest.raises(TimeoutError):
            await b.recv(timeout=0.5)
        return time.process_time() - cpu

    assert run(main) < 0.25


def test_no_reader_or_writer_left_registered(run, duplex):
    a, b = duplex

    async def main():
        loop = asyncio.get_running_loop()
        for _ in range(3):
            with pytest.raises(TimeoutError):
                await b.recv(timeout=0.01)
        waiter = asyncio.ensure_future(b.recv())
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        # our side let go of the descriptor ...
        assert b._readable.waiters == [] and b._readable.loop is None
        assert a._writable.waiters == [] and a._writable.loop is None
        # ... and the loop agrees (asyncio's remove_* returns True if it was registered;
        # uvloop's returns None, so only the check above applies there)
        return loop.remove_reader(b.fileno()), loop.remove_writer(a.fileno())

    assert run(main) in ((False, False), (None, None))


# -- several tasks on one connection ------------------------------------------------------


def test_concurrent_receivers_get_every_message_once(run, duplex):
    a, b = duplex

    async def main():
        got: list[int] = []

        async def receiver():
            while True:
                item = await b.recv()
                if item is None:
                    return
                got.append(item)

        tasks = [asyncio.ensure_future(receiver()) for _ in range(4)]
        await asyncio.sleep(0)
        for i in range(500):
            await a.send(i)
        for _ in tasks:
            await a.send(None)
        await asyncio.wait_for(asyncio.gather(*tasks), STEP)
        return got

    assert sorted(run(main)) == list(range(500))


def test_concurrent_senders_deliver_whole_messages(run, duplex):
    a, b = duplex
    blob = helpers.pattern(300_000)

    async def main():
        async def sender(k):
            for i in range(20):
                await a.send((k, i, blob))

        async def receiver():
            return [await b.recv() for _ in range(80)]

        received = asyncio.ensure_future(receiver())
        await asyncio.wait_for(asyncio.gather(*(sender(k) for k in range(4))), STEP)
        return await asyncio.wait_for(received, STEP)

    got = run(main)
    assert all(item[2] == blob for item in got)
    for k in range(4):
        assert [i for (kk, i, _) in got if kk == k] == list(range(20))


def test_open_pipe_gives_two_async_ends(run, impl):
    a, b = open_pipe(transport=impl.transport)

    async def main():
        async with a, b:
            assert a.transport == b.transport == impl.transport
            await a.send("ping")
            await b.send(await b.recv() + "/pong")
            return await a.recv()

    assert run(main) == "ping/pong"


def test_a_new_recv_does_not_overtake_waiting_ones(run, duplex):
    # A receive called while others wait queues behind them, even though its message is
    # already there: receives complete in the order they were called.
    a, b = duplex

    async def main():
        first = asyncio.ensure_future(b.recv())
        second = asyncio.ensure_future(b.recv())
        await asyncio.sleep(0.01)  # both are waiting
        for i in (1, 2, 3):
            await a.send(i)
        third = await asyncio.wait_for(b.recv(), STEP)
        return await asyncio.wait_for(first, STEP), await asyncio.wait_for(second, STEP), third

    assert run(main) == (1, 2, 3)


def test_a_new_send_does_not_overtake_a_waiting_one(run):
    # Shared memory, a ring that two messages fill: the next send waits for room. Room
    # made while it waits must not go to a send called after it (the new send would find
    # room at once).
    a, b = hyperpipe.Pipe(transport="shm", ring_size=4096) if "shm" in hyperpipe.info()[
        "available_transports"] else (None, None)
    if a is None:
        pytest.skip("needs the shared-memory transport")
    tx = AsyncConnection(a)
    filler, first, second = b"f" * 1500, b"1" * 1500, b"2" * 1500  # each takes half the ring
    try:
        while True:
            try:
                a.send_bytes(filler, timeout=0)
            except hyperpipe.TimeoutError:
                break

        async def main():
            waiting = asyncio.ensure_future(tx.send_bytes(first))
            await asyncio.sleep(0.01)  # it found no room and waits
            assert not waiting.done()
            assert b.recv_bytes() == filler and b.recv_bytes() == filler  # room for both
            await asyncio.wait_for(tx.send_bytes(second), STEP)
            await asyncio.wait_for(waiting, STEP)

        run(main)
        got = []
        while b.poll(0):
            got.append(b.recv_bytes())
        assert [m for m in got if m != filler] == [first, second]
    finally:
        tx.close()
        b.close()


def test_a_send_waiting_for_room_sleeps_only_without_a_descriptor(run, duplex, monkeypatch):
    # A full pipe: the awaited send waits on the transport's room-to-write descriptor, and
    # wakes when the peer reads. It sleeps in a loop only where the transport has none.
    a, b = duplex
    conn = a.connection
    if not conn.capabilities.writable_fd:
        pytest.skip(f"the {conn.transport} transport has no room-to-write descriptor here")
    filler, last = helpers.pattern(4096), helpers.pattern(4096, seed=1)  # no room for either
    while True:
        try:
            conn.send_bytes(filler, timeout=0)
        except hyperpipe.TimeoutError:
            break
    assert conn.arm_writable() is False
    fd, event = conn.writable_fileno()
    assert event in (select.POLLIN, select.POLLOUT)
    sleeps = []
    real_sleep = asyncio.sleep

    async def counting_sleep(delay, *args):
        if delay > 0 and not conn.send_backlog():  # the socket may still flush a parked frame
            sleeps.append(delay)
        return await real_sleep(delay, *args)

    monkeypatch.setattr(asyncio, "sleep", counting_sleep)

    async def main():
        sending = asyncio.ensure_future(a.send_bytes(last))
        await real_sleep(0.05)
        assert not sending.done()
        got = []
        while not sending.done():
            got.append(await b.recv_bytes(timeout=STEP))  # each read makes room
            await real_sleep(0)
        await sending
        while last not in got:
            got.append(await b.recv_bytes(timeout=STEP))
        assert got.count(last) == 1 and got.index(last) == len(got) - 1

    run(main)
    assert sleeps == []
