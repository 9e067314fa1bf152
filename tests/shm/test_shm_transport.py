"""The shared-memory transport on its own: frames, directions, timeouts, readiness, close."""

from __future__ import annotations

import errno
import multiprocessing
import multiprocessing.connection
import os
import select
import threading
import time
from typing import Any

import pytest
from shm_helpers import join_or_kill

import hyperpipe
from hyperpipe import _core, _shm_transport
from hyperpipe._shm_transport import ShmTransport, shm_pipe


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_is_a_transport_named_shm(pair: Any) -> None:
    a, b = pair
    assert isinstance(a, ShmTransport) and isinstance(b, ShmTransport)
    assert a.name == "shm"
    assert a.statistics()["transport"] == "shm"


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 1000, 65535, 65536, 300_000])
def test_frame_round_trip_both_ways(pair: Any, size: int) -> None:
    a, b = pair
    data = os.urandom(size)
    a.send_frame(memoryview(data), None)
    assert bytes(b.recv_frame(None, soon())) == data
    b.send_frame(memoryview(data), None)
    assert bytes(a.recv_frame(None, soon())) == data


def test_many_frames_keep_order_across_wraps() -> None:
    a, b = shm_pipe(False, ring_size=4096)
    try:
        sent = []
        for i in range(3000):
            msg = bytes([i % 251]) * (i % 700)
            sent.append(msg)
            b.send_frame(memoryview(msg), soon())
            if i % 3 == 2:  # keep the ring from filling: drain in bursts
                while a.poll(0):
                    assert a.recv_frame(None, soon()) == sent.pop(0)
        while sent:
            assert a.recv_frame(None, soon()) == sent.pop(0)
        assert not a.poll(0)
    finally:
        a.close()
        b.close()


def test_simplex_directions() -> None:
    reader, writer = shm_pipe(False)
    try:
        with pytest.raises(OSError):
            reader.send_frame(memoryview(b"x"), None)
        with pytest.raises(OSError):
            writer.recv_frame(None, None)
        writer.send_frame(memoryview(b"one way"), None)
        assert reader.recv_frame(None, soon()) == b"one way"
    finally:
        reader.close()
        writer.close()


def test_maxlength_refuses_without_consuming(pair: Any) -> None:
    a, b = pair
    a.send_frame(memoryview(b"0123456789"), None)
    with pytest.raises(hyperpipe.MessageTooLongError):
        b.recv_frame(5, soon())
    assert b.recv_frame(10, soon()) == b"0123456789"


def test_recv_frame_into(pair: Any) -> None:
    a, b = pair
    a.send_frame(memoryview(b"hello"), None)
    buf = bytearray(10)
    assert b.recv_frame_into(memoryview(buf), 3, soon()) == 5
    assert buf == b"\0\0\0hello\0\0"
    a.send_frame(memoryview(b"too long for it"), None)
    with pytest.raises(hyperpipe.BufferTooShort) as info:
        b.recv_frame_into(memoryview(buf), 0, soon())
    assert info.value.args[0] == b"too long for it"  # consumed, whole message attached
    a.send_frame(memoryview(b"next"), None)
    assert b.recv_frame(None, soon()) == b"next"


def test_timeout_leaves_stream_intact(pair: Any) -> None:
    a, b = pair
    with pytest.raises(hyperpipe.TimeoutError):
        b.recv_frame(None, time.monotonic() + 0.05)
    with pytest.raises(TimeoutError):
        b.recv_object(time.monotonic() - 1)  # a deadline already passed: no wait
    a.send_frame(memoryview(b"after"), None)
    assert b.recv_frame(None, soon()) == b"after"


def test_send_blocks_on_full_ring_until_deadline() -> None:
    reader, writer = shm_pipe(False, ring_size=4096)
    try:
        n = 0
        with pytest.raises(hyperpipe.TimeoutError):
            while True:
                writer.send_frame(memoryview(b"z" * 500), time.monotonic() + 0.05)
                n += 1
        assert n > 0
        for _ in range(n):  # nothing half-sent: exactly the n accepted frames
            assert reader.recv_frame(None, soon()) == b"z" * 500
        assert not reader.poll(0)
    finally:
        reader.close()
        writer.close()


def test_objects_small_and_custom(pair: Any) -> None:
    a, b = pair
    for obj in [None, 42, (42, "hello", 3.14), {"k": [1, 2, {3}]}, b"x" * 100, "é" * 50]:
        a.send_object(obj, None)
        assert b.recv_object(soon()) == obj
    a.send_frame(memoryview(b"raw bytes"), None)
    with pytest.raises(Exception):
        b.recv_object(soon())  # not a pickle: consumed, the next frame is intact
    a.send_object("ok", None)
    assert b.recv_object(soon()) == "ok"


def test_unpicklable_sends_nothing(pair: Any) -> None:
    a, b = pair
    with pytest.raises(Exception):
        a.send_object(lambda: 0, None)
    assert not b.poll(0)
    a.send_object("fine", None)  # the pickler was reset and still works
    assert b.recv_object(soon()) == "fine"


def test_batch_frames(pair: Any) -> None:
    a, b = pair
    frames = [memoryview(bytes([i]) * i) for i in range(200)] + [memoryview(b"B" * 200_000)]
    a.send_frames(frames, soon())
    got: list = []
    while len(got) < len(frames):
        got += [bytes(f) for f in b.recv_frames(64, soon())]
    assert got == [bytes(f) for f in frames]


def test_poll_and_fileno_readiness(pair: Any) -> None:
    a, b = pair
    fd = b.fileno()
    assert not b.poll(0)
    assert select.select([fd], [], [], 0)[0] == []
    a.send_frame(memoryview(b"1"), None)
    a.send_frame(memoryview(b"2"), None)
    assert b.poll(0) and b.poll(0)  # poll does not consume
    assert select.select([fd], [], [], 5)[0] == [fd]
    assert b.recv_frame(None, soon()) == b"1"
    assert select.select([fd], [], [], 0)[0] == [fd]  # one still waiting
    assert b.recv_frame(None, soon()) == b"2"
    assert select.select([fd], [], [], 0)[0] == []
    assert not b.poll(0)


def test_fileno_wakes_an_external_waiter(pair: Any) -> None:
    a, b = pair

    def later() -> None:
        time.sleep(0.1)
        a.send_frame(memoryview(b"wake"), None)

    t = threading.Thread(target=later)
    t.start()
    ready = multiprocessing.connection.wait([b.fileno()], timeout=10)
    t.join()
    assert ready == [b.fileno()]
    assert b.recv_frame(None, soon()) == b"wake"


def test_fileno_readable_at_peer_close(pair: Any) -> None:
    a, b = pair
    a.close()
    assert select.select([b.fileno()], [], [], 5)[0] == [b.fileno()]
    assert b.poll(0)
    with pytest.raises(EOFError):
        b.recv_frame(None, soon())


def test_close_from_another_thread_wakes_recv(pair: Any) -> None:
    a, b = pair
    errors: list = []

    def blocked() -> None:
        try:
            b.recv_frame(None, None)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assert
            errors.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.2)  # past the spin window: asleep in poll()
    b.close()
    t.join(10)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], hyperpipe.ConnectionClosedError)
    with pytest.raises(hyperpipe.ConnectionClosedError):
        b.recv_frame(None, None)
    b.close()  # idempotent


def test_close_from_another_thread_wakes_full_send() -> None:
    reader, writer = shm_pipe(False, ring_size=4096)
    errors: list = []

    def blocked() -> None:
        try:
            while True:
                writer.send_frame(memoryview(b"y" * 1000), None)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.2)
    writer.close()
    t.join(10)
    reader.close()
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], hyperpipe.ConnectionClosedError)


@pytest.mark.parametrize("size", [1000, 1 << 20])
def test_close_during_sends_from_another_thread(size: int) -> None:
    # The peer gets every message whole, then EOF: released by the sending thread when it
    # leaves, although its exception (and the frames in its traceback) is still alive.
    reader, writer = hyperpipe.Pipe(False, transport="shm")
    errors: list = []
    message = bytes(range(256)) * (size // 256)

    def sending() -> None:
        try:
            while True:
                writer.send_bytes(message)
        except BaseException as exc:  # noqa: BLE001 - kept, with its traceback, on purpose
            errors.append(exc)

    t = threading.Thread(target=sending)
    t.start()
    got = [reader.recv_bytes() for _ in range(5)]
    writer.close()
    t.join(10)
    assert not t.is_alive() and len(errors) == 1
    assert isinstance(errors[0], hyperpipe.ConnectionClosedError)
    while True:
        assert reader.poll(10), "no EOF after the last message"
        try:
            got.append(reader.recv_bytes())
        except EOFError:
            break
    assert all(m == message for m in got)
    reader.close()


def test_sender_and_receiver_threads_concurrently(pair: Any) -> None:
    a, b = pair
    n = 20000

    def pump(t: Any) -> None:
        for i in range(n):
            t.send_frame(memoryview(i.to_bytes(4, "little")), None)

    threads = [threading.Thread(target=pump, args=(a,)), threading.Thread(target=pump, args=(b,))]
    for t in threads:
        t.start()
    for end in (b, a):
        for i in range(n):
            assert int.from_bytes(end.recv_frame(None, soon()), "little") == i
    for t in threads:
        t.join(10)


def test_peer_close_delivers_then_eof_and_broken_pipe(pair: Any) -> None:
    a, b = pair
    a.send_frame(memoryview(b"last words"), None)
    a.close()
    assert b.recv_frame(None, soon()) == b"last words"
    with pytest.raises(hyperpipe.PeerClosedError):
        b.recv_frame(None, soon())
    with pytest.raises(EOFError):
        b.recv_object(soon())
    with pytest.raises(BrokenPipeError):
        for _ in range(100):  # the liveness check runs every 10 ms at most
            b.send_frame(memoryview(b"x"), None)
            time.sleep(0.005)


def test_options_are_checked() -> None:
    with pytest.raises(TypeError):
        shm_pipe(True, no_such_option=1)
    with pytest.raises(ValueError):
        shm_pipe(True, ring_size=5000)
    with pytest.raises(TypeError):
        shm_pipe(True, ring_size="big")
    a, b = shm_pipe(True, ring_size=1 << 16, oob_threshold=1024, spin_us=0)
    a.send_frame(memoryview(b"q" * 2000), None)  # above the threshold: out of band
    assert bytes(b.recv_frame(None, soon())) == b"q" * 2000
    assert b.statistics()["heap_received"] == 1
    a.close()
    b.close()


def test_segment_header_checked_on_attach() -> None:
    import socket

    fd = os.memfd_create("hyperpipe-bogus")
    os.write(fd, b"\0" * 8192)
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    efd = os.eventfd(0)
    with pytest.raises(hyperpipe.ProtocolError, match="magic"):
        _core.Endpoint(fd, s1.detach(), efd, -1, 0, -1)  # takes and closes the fds
    s2.close()
    good = _core.segment_create(4096, 1)
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(hyperpipe.ProtocolError, match="ring index"):
        _core.Endpoint(good, s1.detach(), os.eventfd(0), -1, 1, -1)  # ring 1 of a 1-ring segment
    s2.close()


def _child_echo(reduced: tuple) -> None:
    rebuild, args = reduced
    t = rebuild(*args)
    obj = t.recv_object(time.monotonic() + 30)
    t.send_object(("echo", obj), None)
    t.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_end_travels_to_a_child(method: str) -> None:
    a, b = shm_pipe(True)
    ctx = multiprocessing.get_context(method)
    p = ctx.Process(target=_child_echo, args=(b.reduce(),))
    p.start()
    b.close()
    a.send_object({"n": 1}, None)
    assert a.recv_object(time.monotonic() + 30) == ("echo", {"n": 1})
    with pytest.raises(EOFError):
        a.recv_object(time.monotonic() + 30)
    assert join_or_kill(p) == 0
    a.close()


def test_after_fork_in_child_keeps_working() -> None:
    a, b = shm_pipe(True)
    ctx = multiprocessing.get_context("fork")

    def child() -> None:
        b.after_fork_in_child()
        b.send_frame(memoryview(b"from child"), None)
        os._exit(0)

    p = ctx.Process(target=child)
    p.start()
    assert a.recv_frame(None, soon(30)) == b"from child"
    join_or_kill(p)
    a.close()
    b.close()


def test_available_and_module_surface() -> None:
    assert _shm_transport.available() is True
    assert callable(_shm_transport.shm_pipe)


def test_a_stale_wake_up_count_is_drained_by_poll():
    """A late eventfd write (producer signalled, reader consumed meanwhile) leaves a count
    with nothing to read: poll(0) must drain it, or fileno() stays readable and every
    outside poller (select, wait, an event loop) spins."""
    import re
    import select

    a, b = hyperpipe.Pipe(transport="shm")
    try:
        fd = b.fileno()
        with open(f"/proc/self/fdinfo/{fd}") as fdinfo:
            watched = [int(x) for x in re.findall(r"tfd:\s+(\d+)", fdinfo.read())]
        efds = [t for t in watched if os.readlink(f"/proc/self/fd/{t}").startswith("anon_inode:[eventfd")]
        assert len(efds) == 1
        os.eventfd_write(efds[0], 1)  # the stale count
        assert select.select([fd], [], [], 0)[0]
        assert b.poll(0) is False
        assert not select.select([fd], [], [], 0)[0]
        a.send("x")
        assert select.select([fd], [], [], 5)[0] and b.recv() == "x"
        assert not select.select([fd], [], [], 0)[0]
    finally:
        a.close()
        b.close()


def test_a_send_with_no_time_left_does_not_spin_on_a_full_ring() -> None:
    # send(timeout=0) on a full ring must fail at once: it used to spin for the whole
    # spin window (50 µs) first, which an event loop retrying sends paid every time.
    reader, writer = shm_pipe(False, ring_size=4096)
    try:
        while True:
            try:
                writer.send_frame(memoryview(b"x" * 1000), 0.0)
            except hyperpipe.TimeoutError:
                break
        cpu = time.thread_time()
        for _ in range(400):
            with pytest.raises(hyperpipe.TimeoutError):
                writer.send_frame(memoryview(b"x" * 1000), time.monotonic())
        # 400 spins of the window would take 20 ms of CPU; failing at once takes ~1 ms
        # (~10 ms under AddressSanitizer).
        assert time.thread_time() - cpu < 0.015
    finally:
        reader.close()
        writer.close()


@pytest.mark.parametrize(
    "error, answer, kept",
    [(errno.EMFILE, True, None), (errno.ENFILE, True, None), (errno.ENOSYS, False, False)],
    ids=["out-of-descriptors", "system-out-of-files", "no-memfd"],
)
def test_the_availability_probe_tells_a_shortage_from_a_missing_feature(
    monkeypatch: Any, error: int, answer: bool, kept: Any
) -> None:
    # A process that is out of descriptors when it first asks must not lose the shm
    # transport for good: that answer is not kept, and Pipe() reports the shortage itself.
    def failing_probe(*args: Any) -> int:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(_shm_transport, "_available", None)
    monkeypatch.setattr(_shm_transport._core, "segment_create", failing_probe)
    assert _shm_transport.available() is answer
    assert _shm_transport._available is kept
