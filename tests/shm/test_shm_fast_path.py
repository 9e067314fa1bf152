"""Connection.send_bytes/recv_bytes done in C (ShmTransport.fast_path) and every way back
to the Connection's own methods: each call must behave exactly as without the fast path."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from typing import Any

import pytest

import hyperpipe
from hyperpipe import errors
from hyperpipe._connection import Connection


def shm_pair(**options: Any) -> tuple[Any, Any]:
    return hyperpipe.Pipe(transport="shm", **options)


def test_the_hot_methods_are_the_c_ones_and_carry_the_signature() -> None:
    a, b = shm_pair()
    with a, b:
        assert type(a.send_bytes).__name__ == "builtin_function_or_method"
        assert type(b.recv_bytes).__name__ == "builtin_function_or_method"
        import inspect

        assert list(inspect.signature(a.send_bytes).parameters) == ["buf", "offset", "size", "timeout"]
        assert list(inspect.signature(b.recv_bytes).parameters) == ["maxlength", "timeout"]


def test_pipe_ends_keep_the_python_methods() -> None:
    # (plain sockets have C methods of their own: tests/test_socket_transport_fastpath.py)
    b, a = hyperpipe.Pipe(duplex=False, transport="socket")
    with a, b:
        assert a.send_bytes.__func__ is Connection.send_bytes  # type: ignore[attr-defined]


def test_fast_and_slow_calls_interleave_in_order() -> None:
    a, b = shm_pair()
    with a, b:
        sent = [b"small", bytearray(b"array"), memoryview(b"view"), b"", b"x" * 70_000,
                memoryview(b"0123456789")[2:5], b"tail"]
        a.send_bytes(sent[0])
        a.send_bytes(sent[1])
        a.send_bytes(sent[2])
        a.send_bytes(sent[3], timeout=1)  # keyword: the Connection's method
        a.send_bytes(sent[4])  # out of band
        a.send_bytes(b"0123456789", 2, 3)  # offset/size
        a.send_bytes(sent[6])
        got = [b.recv_bytes(), b.recv_bytes(), b.recv_bytes(timeout=1), b.recv_bytes(),
               b.recv_bytes(), b.recv_bytes(100), b.recv_bytes()]
        assert got == [bytes(m) for m in sent]
        assert all(type(g) is bytes for g in got)


def test_errors_are_the_connections() -> None:
    a, b = shm_pair()
    with a, b:
        with pytest.raises(TypeError):
            a.send_bytes("text")  # type: ignore[arg-type]
        with pytest.raises(BufferError):
            a.send_bytes(memoryview(bytearray(8))[::2])  # not contiguous
        with pytest.raises(ValueError, match="offset is negative"):
            a.send_bytes(b"abc", -1)
        with pytest.raises(errors.TimeoutError):
            b.recv_bytes(timeout=0)
        a.send_bytes(b"still in step")
        assert b.recv_bytes() == b"still in step"


def test_a_full_ring_blocks_then_delivers_everything() -> None:
    a, b = shm_pair(ring_size=4096)
    with a, b:
        msgs = [bytes([i % 256]) * 1000 for i in range(200)]  # 50x the ring
        got: list = []

        def reader() -> None:
            for _ in msgs:
                got.append(b.recv_bytes(timeout=10))

        t = threading.Thread(target=reader)
        t.start()
        for m in msgs:
            a.send_bytes(m)
        t.join(10)
        assert not t.is_alive()
        assert got == msgs


def test_recv_waits_when_nothing_is_there() -> None:
    a, b = shm_pair()
    with a, b:
        t = threading.Timer(0.05, a.send_bytes, (b"late",))
        t.start()
        assert b.recv_bytes() == b"late"
        t.join(5)


def test_closed_connection_raises_also_through_a_kept_bound_method() -> None:
    a, b = shm_pair()
    send, recv = a.send_bytes, b.recv_bytes  # as multiprocessing.Queue keeps them
    a.send_bytes(b"before")
    b.close()
    a.close()
    assert "send_bytes" not in vars(a) and "recv_bytes" not in vars(b)
    with pytest.raises(errors.ConnectionClosedError, match="handle is closed"):
        send(b"after")
    with pytest.raises(errors.ConnectionClosedError, match="handle is closed"):
        recv()


def test_the_connection_still_dies_with_its_last_reference() -> None:
    a, b = shm_pair()
    send = a.send_bytes
    ref = weakref.ref(a)
    gc.disable()  # no cycle may keep it alive: plain reference counting must free it
    try:
        del a
        assert ref() is None
    finally:
        gc.enable()
    with pytest.raises(EOFError):
        b.recv_bytes(timeout=5)  # the dropped end was closed
    with pytest.raises(errors.ConnectionClosedError):
        send(b"x")  # the Connection is gone
    b.close()


def test_bad_message_length_stops_the_fast_receive() -> None:
    a, b = shm_pair()
    with a, b:
        recv = b.recv_bytes
        a.send_bytes(b"x" * 100)
        a.send_bytes(b"next")
        with pytest.raises(OSError, match="bad message length"):
            b.recv_bytes(10)
        with pytest.raises(OSError, match="connection is write-only"):
            b.recv_bytes()
        with pytest.raises(OSError, match="connection is write-only"):
            recv()  # a bound method taken before
        b.send_bytes(b"still writable")
        assert a.recv_bytes() == b"still writable"


def test_one_way_pipe_ends_have_one_direction_each() -> None:
    r, w = hyperpipe.Pipe(duplex=False, transport="shm")
    with r, w:
        assert "recv_bytes" not in vars(w) and "send_bytes" not in vars(r)
        with pytest.raises(OSError, match="connection is read-only"):
            r.send_bytes(b"x")
        with pytest.raises(OSError, match="connection is write-only"):
            w.recv_bytes()
        w.send_bytes(b"one way")
        assert r.recv_bytes() == b"one way"


def wait_until_inside(lock: Any) -> None:
    """Until a thread holds the Connection's lock and has gone into the endpoint's wait."""
    deadline = time.monotonic() + 5
    while not lock.locked() and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.02)  # past its spin: asleep with the GIL released


def test_no_fast_receive_while_another_thread_waits_in_recv() -> None:
    # The waiting thread is inside the endpoint with the GIL released: a receive beside it
    # must queue behind it (the Connection's lock), never read the ring under it. So the
    # thread that waited first gets the first message.
    a, b = shm_pair()
    with a, b:
        got: list = []
        t = threading.Thread(target=lambda: got.append(b.recv_bytes(timeout=10)))
        t.start()
        wait_until_inside(b._recv_lock)
        a.send_bytes(b"first")
        a.send_bytes(b"second")
        second = b.recv_bytes()  # no arguments: the call the fast path takes
        t.join(10)
        assert (got, second) == ([b"first"], b"second")


def test_no_fast_send_while_another_thread_waits_for_room() -> None:
    # A sender blocked on a full ring writes its frame with the GIL released once room
    # comes: a send beside it must queue behind it, even when its own smaller frame would
    # fit in what is left, never write the ring under it.
    a, b = shm_pair(ring_size=4096)
    with a, b:
        big, blocked = b"B" * 1500, b"blocked" * 200
        a.send_bytes(big)
        a.send_bytes(big)  # 1,080 bytes left: room for a small frame, not for `blocked`
        with pytest.raises(errors.TimeoutError):
            a.send_bytes(blocked, timeout=0)
        sender = threading.Thread(target=a.send_bytes, args=(blocked,))
        sender.start()
        wait_until_inside(a._send_lock)
        results: list = []

        def drain() -> None:
            while len(results) < 4:
                results.append(b.recv_bytes(timeout=10))

        reader = threading.Timer(0.05, drain)
        reader.start()
        a.send_bytes(b"small")  # waits for the blocked sender, which the reader frees
        sender.join(10)
        reader.join(10)
        assert not sender.is_alive() and not reader.is_alive()
        assert results == [big, big, blocked, b"small"]


def test_batches_fast_and_slow_keep_order_and_errors() -> None:
    a, b = shm_pair()
    with a, b:
        a.send_bytes_many([b"1", bytearray(b"2"), memoryview(b"3")])  # in C
        a.send_bytes_many((b"4", b"x" * 70_000, b"6"))  # one out of band: the Connection's way
        a.send_bytes_many(iter([b"7"]))  # not a list: the Connection's way
        a.send_bytes_many([b"8"], timeout=1)
        a.send_bytes_many([])
        with pytest.raises(TypeError):
            a.send_bytes_many([b"not sent", "text"])  # type: ignore[list-item]
        with pytest.raises(BufferError):
            a.send_bytes_many([b"not sent", memoryview(bytearray(8))[::2]])
        got = b.recv_bytes_many(2) + b.recv_bytes_many() + b.recv_bytes_many(timeout=1)
        while b.poll(0):
            got += b.recv_bytes_many(3)
        assert got == [b"1", b"2", b"3", b"4", b"x" * 70_000, b"6", b"7", b"8"]
        assert all(type(g) is bytes for g in got)
        for bad in (0, -1, 2.0, "3"):
            with pytest.raises((ValueError, TypeError)):
                b.recv_bytes_many(bad)  # type: ignore[arg-type]
        with pytest.raises(errors.TimeoutError):
            b.recv_bytes_many(timeout=0)


def test_a_batch_bigger_than_the_room_waits_and_goes_out_whole() -> None:
    a, b = shm_pair(ring_size=4096)
    with a, b:
        batch = [bytes([i]) * 500 for i in range(40)]  # 5x the ring
        got: list = []

        def reader() -> None:
            while len(got) < 80:
                got.extend(b.recv_bytes_many(7, timeout=10))

        t = threading.Thread(target=reader)
        t.start()
        a.send_bytes_many(batch)
        a.send_bytes_many(batch)
        t.join(10)
        assert got == batch + batch


def test_receive_many_returns_what_waits_and_stops_before_a_big_frame() -> None:
    a, b = shm_pair()
    with a, b:
        a.send_bytes(b"a")
        a.send_bytes(b"b")
        a.send_bytes(b"B" * 100_000)
        a.send_bytes(b"c")
        assert b.recv_bytes_many() == [b"a", b"b"]
        assert b.recv_bytes_many() == [b"B" * 100_000]
        assert b.recv_bytes_many() == [b"c"]


def test_fileno_readiness_stays_true_through_fast_receives() -> None:
    import select

    a, b = shm_pair()
    with a, b:
        fd = b.fileno()

        def readable() -> bool:
            return bool(select.select([fd], [], [], 0)[0])

        assert not readable()
        a.send_bytes(b"one")
        a.send_bytes_many([b"two", b"three"])
        assert readable()
        assert b.recv_bytes() == b"one"
        assert readable()  # two more wait
        assert b.recv_bytes_many() == [b"two", b"three"]
        assert not readable()
        a.send_bytes(b"four")
        assert readable()
        assert b.recv_bytes() == b"four"
        assert not readable()
