"""The socket transport's fast paths: a frame not yet started is read with one call for the
header and one for a small body, and a small frame is written with one call. Each falls
back to the general state machine when a read or write falls short; these tests make
them fall short at every byte and check that nothing is lost, duplicated or read ahead.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import select
import socket
import struct
import threading
import time
from typing import Any

import pytest

import helpers
import hyperpipe
from hyperpipe import _socket_transport


def _frame(payload: bytes, long: bool = False) -> bytes:
    if long:  # the stdlib's escape for big messages, legal for any length
        return struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload
    return struct.pack("!i", len(payload)) + payload


def _ends(kind: str) -> tuple[Any, Any, int]:
    """(receiving Connection, sending Connection, descriptor to write raw bytes into)."""
    if kind == "socketpair":
        a, b = hyperpipe.Pipe(transport="socket")
        return a, b, b.fileno()
    reader, writer = hyperpipe.Pipe(duplex=False, transport="socket")
    return reader, writer, writer.fileno()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # the transport made a pipe's write end non-blocking
            select.select([], [fd], [], 5)


def _receive(conn: Any, call: str, timeout: float) -> Any:
    if call == "recv_bytes_into":
        buf = bytearray(100_000)
        size = conn.recv_bytes_into(buf, 3, timeout=timeout)
        return bytes(buf[3 : 3 + size])
    return getattr(conn, call)(timeout=timeout)


@pytest.mark.parametrize("kind", ["socketpair", "pipe"])
@pytest.mark.parametrize("call", ["recv_bytes", "recv", "recv_bytes_into"])
@pytest.mark.parametrize("shape", ["small", "empty", "long_header", "past_small_frame"])
def test_a_frame_cut_at_every_byte_still_arrives_whole(kind: str, call: str, shape: str) -> None:
    payload = {
        "small": helpers.pattern(23),
        "empty": b"",
        "long_header": helpers.pattern(9),
        "past_small_frame": helpers.pattern(_socket_transport._SMALL_FRAME + 7),
    }[shape]
    if call == "recv":
        payload = pickle.dumps(payload)
    frame = _frame(payload, long=shape == "long_header")
    after = _frame(pickle.dumps("next") if call == "recv" else b"next")
    expected = pickle.loads(payload) if call == "recv" else payload
    # every cut in the header and around it; a sample of the cuts in a big body
    cuts = list(range(1, min(len(frame), 40)))
    if len(frame) > 40:
        # (the first part is written before the receive: it must fit in a pipe)
        cuts += [len(frame) // 2, min(len(frame) - 1, 60_000)]
    rx, tx, raw = _ends(kind)
    try:
        for cut in cuts:
            _write_all(raw, frame[:cut])
            with pytest.raises(hyperpipe.TimeoutError):
                _receive(rx, call, 0.0)
            # the rest may be more than a pipe holds: written while the receiver reads
            writer = threading.Thread(target=_write_all, args=(raw, frame[cut:] + after))
            writer.start()
            assert _receive(rx, call, 10) == expected, f"cut at byte {cut}"
            assert _receive(rx, call, 10) == (b"next" if call != "recv" else "next")
            writer.join(10)
    finally:
        rx.close()
        tx.close()


@pytest.mark.parametrize("kind", ["socketpair", "pipe"])
def test_a_frame_trickling_in_is_received_by_a_blocking_call(kind: str, run_in_thread: Any) -> None:
    """No timeout: the fast path hands a short read to the general one, which waits."""
    payloads = [helpers.pattern(n, seed=n) for n in (0, 1, 3, 4, 5, 100, 5000)]
    data = b"".join(_frame(p) for p in payloads)
    rx, tx, raw = _ends(kind)

    def trickle() -> None:
        for i in range(0, len(data), 997):
            _write_all(raw, data[i : i + 997])
            time.sleep(0.001)

    try:
        thread = run_in_thread(trickle)
        got = [rx.recv_bytes() for _ in payloads]
        thread.join(10)
        assert got == payloads
        assert not thread.errors
    finally:
        rx.close()
        tx.close()


@pytest.mark.parametrize("kind", ["socketpair", "pipe"])
@pytest.mark.parametrize("size", [0, 10, 65536, 65537, 200_000])
@pytest.mark.parametrize("timeout", [None, 10])  # a socket: a blocking read / MSG_DONTWAIT
def test_nothing_past_the_frame_is_read(kind: str, size: int, timeout: Any) -> None:
    """The bytes after a received frame are still in the descriptor, untouched."""
    rx, tx, raw = _ends(kind)
    rest = b"\x01\x02\x03 not a frame of ours"
    payload = helpers.pattern(size)
    try:
        sender = threading.Thread(target=_write_all, args=(raw, _frame(payload) + rest))
        sender.start()
        assert rx.recv_bytes(timeout=timeout) == payload
        sender.join(10)
        assert os.read(rx.fileno(), 1000) == rest
    finally:
        rx.close()
        tx.close()


def _share_reader(conn: Any, lock: Any, results: Any, stdlib_fd: int) -> None:
    """Receive under ``lock`` until the sentinel; report what arrived."""
    if stdlib_fd >= 0:  # the same end, read by the standard library's own Connection
        conn = multiprocessing.connection.Connection(os.dup(stdlib_fd))
    got = []
    while True:
        with lock:
            item = conn.recv_bytes()
        if item == b"stop":
            break
        got.append(item)
    results.send(got)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_two_processes_share_one_end_under_a_lock(start_method: str) -> None:
    """A hyperpipe reader and a stdlib reader take turns on one descriptor: each frame
    goes whole to one of them, which only works if neither reads past its frame."""
    ctx = multiprocessing.get_context(start_method)
    rx, tx = hyperpipe.Pipe(transport="socket")
    lock = ctx.Lock()
    procs, pipes = [], []
    # A raw descriptor number is only valid in a forked child: under spawn both readers
    # are hyperpipe ends (each a DupFd of the same socket).
    for stdlib in (False, start_method == "fork"):
        r, w = ctx.Pipe(duplex=False)
        fd = rx.fileno() if stdlib else -1
        proc = ctx.Process(target=_share_reader, args=(rx, lock, w, fd), daemon=True)
        proc.start()
        w.close()
        procs.append(proc)
        pipes.append(r)
    sizes = [0, 1, 4, 100, 70_000, 5, 300_000, 16_384, 16_385] * 12
    sent = [helpers.pattern(n, seed=i) for i, n in enumerate(sizes)]
    try:
        for payload in sent:
            tx.send_bytes(payload, timeout=30)
        for _ in procs:
            tx.send_bytes(b"stop", timeout=30)
        got = [item for r in pipes for item in r.recv()]
        for proc in procs:
            proc.join(helpers.CHILD_TIMEOUT)
            assert proc.exitcode == 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        rx.close()
        tx.close()
        for r in pipes:
            r.close()
    assert sorted(got) == sorted(sent)


class _ShortWrites:
    """Stands in for the transport's socket: the first ``send`` writes only ``first`` bytes
    (0: would block), later ones behave normally."""

    def __init__(self, sock: socket.socket, first: int) -> None:
        self.sock, self.first, self.calls = sock, first, 0

    def send(self, data: Any, flags: int = 0) -> int:
        self.calls += 1
        if self.calls == 1:
            if self.first == 0:
                raise BlockingIOError()
            return self.sock.send(memoryview(data)[: self.first], flags)
        return self.sock.send(data, flags)


@pytest.mark.parametrize("timeout", [None, 0.0])
def test_a_small_frame_written_in_part_is_finished_never_cut(timeout: Any) -> None:
    a, b = hyperpipe.Pipe(transport="socket")
    transport = a._transport
    payload = helpers.pattern(300)
    frame_len = 4 + len(payload)
    try:
        for first in range(frame_len):
            # the general path writes the rest (the socket has room: even at a passed
            # deadline it tries once before it gives up)
            transport._plain = _ShortWrites(transport._sock, first)
            a.send_bytes(payload, timeout=timeout)
            assert transport._plain.calls == 1
            assert b.recv_bytes(timeout=10) == payload, f"first write of {first} bytes"
            transport._plain = transport._sock
            a.send_bytes(b"after")
            assert b.recv_bytes(timeout=10) == b"after"
            a._transport.flush(time.monotonic() + 10)
            assert a._transport.send_backlog() == 0
    finally:
        a.close()
        b.close()


def test_a_small_frame_cut_by_a_full_socket_is_parked_whole() -> None:
    """A real partial write: a small send buffer takes part of a 16,000-byte frame."""
    a, b = hyperpipe.Pipe(transport="socket")
    a._transport._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payloads = [helpers.pattern(16_000, seed=i) for i in range(6)]
    sent = []
    try:
        for payload in payloads:
            try:
                a.send_bytes(payload, timeout=0.0)
            except hyperpipe.TimeoutError:
                continue  # refused: nothing of it may be in the stream
            sent.append(payload)
        assert sent, "not even the first frame was accepted"
        got: list[bytes] = []
        reader = threading.Thread(
            target=lambda: got.extend(iter(lambda: b.recv_bytes(timeout=10), b"end"))
        )
        reader.start()
        a.send_bytes(b"end", timeout=10)  # behind any parked frame
        reader.join(20)
        assert got == sent
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["socketpair", "pipe"])
@pytest.mark.parametrize("timeout", [None, 60.0])
def test_close_wakes_a_receiver_blocked_in_recv(
    kind: str, timeout: Any, run_in_thread: Any
) -> None:
    """With no timeout a socket end waits in recv() itself (no poll), and close() from
    another thread still wakes it; with a timeout, or on a pipe end, it waits in poll()."""
    rx, tx, _ = _ends(kind)
    try:
        started = threading.Event()

        def blocked() -> None:
            started.set()
            rx.recv_bytes(timeout=timeout)

        waiter = run_in_thread(blocked)
        assert started.wait(10)
        time.sleep(0.2)
        assert waiter.is_alive()
        # Waiting in poll() needs the wake-up eventfd; blocking in recv() does not.
        blocks_in_recv = kind == "socketpair" and timeout is None
        assert (rx._transport._wake_fd < 0) is blocks_in_recv
        rx.close()
        waiter.join(10)
        assert not waiter.is_alive(), "close() did not wake the receiver"
        assert len(waiter.errors) == 1
        assert isinstance(waiter.errors[0], hyperpipe.ConnectionClosedError)
    finally:
        rx.close()
        tx.close()


def test_the_descriptor_is_closed_once_the_last_call_has_left(run_in_thread: Any) -> None:
    """close() while a receive is running leaves the descriptor to that call to close."""
    a, b = hyperpipe.Pipe(transport="socket")
    transport = a._transport
    fd = a.fileno()
    inside, release = threading.Event(), threading.Event()
    real_receive_new = transport._receive_new

    def held(*args: Any) -> Any:
        inside.set()
        release.wait(10)
        return real_receive_new(*args)

    transport._receive_new = held
    try:
        thread = run_in_thread(lambda: a.recv_bytes(timeout=0.5))
        assert inside.wait(10)
        a.close()
        os.fstat(fd)  # still open: the receive is using it
        release.set()
        thread.join(10)
        assert len(thread.errors) == 1 and isinstance(thread.errors[0], OSError)
        with pytest.raises(OSError):
            os.fstat(fd)  # closed by the receive on its way out
    finally:
        release.set()
        b.close()


@pytest.mark.parametrize("limit", [0, 10, 65535])
@pytest.mark.parametrize("timeout", [None, 10])
def test_max_message_size_holds_on_the_short_path(limit: int, timeout: Any) -> None:
    """A small frame over max_message_size is refused from its header (the short path
    reads small frames whole with one call); one at the limit arrives."""
    s1, s2 = socket.socketpair()
    rx = hyperpipe.Connection(_socket_transport.SocketTransport(sock=s1, max_message_size=limit))
    try:
        s2.sendall(_frame(helpers.pattern(limit)) + _frame(helpers.pattern(limit + 1)))
        assert rx.recv_bytes(timeout=timeout) == helpers.pattern(limit)
        with pytest.raises(hyperpipe.MessageTooLongError, match="max_message_size"):
            rx.recv_bytes(timeout=timeout)
    finally:
        rx.close()
        s2.close()


@pytest.mark.parametrize("kind", ["socketpair", "pipe"])
def test_a_batch_takes_what_waits_without_polling_first(kind: str) -> None:
    """recv_bytes_many: the frames already there, up to maxcount, each with its own reads
    and no poll() before it; a frame cut short stays for the next call, then EOF."""
    rx, tx, raw = _ends(kind)
    payloads = [helpers.pattern(n, seed=n) for n in (1, 100, 5000, 0, 70_000)]
    try:
        rx._transport.poll = None  # a batch that polls fails here (one system call per frame)
        _write_all(raw, b"".join(_frame(p) for p in payloads[:4]) + _frame(payloads[4])[:10])
        assert rx.recv_bytes_many(3, timeout=10) == payloads[:3]
        assert rx.recv_bytes_many(10, timeout=10) == payloads[3:4]  # stops at the cut frame
        writer = threading.Thread(target=_write_all, args=(raw, _frame(payloads[4])[10:]))
        writer.start()
        assert rx.recv_bytes_many(10, timeout=10) == payloads[4:]
        writer.join(10)
        _write_all(raw, _frame(b"last"))
        tx.close()
        assert rx.recv_bytes_many(10, timeout=10) == [b"last"]  # the end is for the next call
        with pytest.raises(EOFError):
            rx.recv_bytes_many(10, timeout=10)
    finally:
        rx.close()
        tx.close()


@pytest.mark.parametrize(
    "bad",
    [struct.pack("!i", -5), _frame(b"x" * 100)],
    ids=["corrupt-header", "over-max_message_size"],
)
def test_a_batch_keeps_the_frames_before_a_broken_one(bad: bytes) -> None:
    """The frames taken before a broken one are delivered; the next call raises."""
    s1, s2 = socket.socketpair()
    rx = hyperpipe.Connection(_socket_transport.SocketTransport(sock=s1, max_message_size=50))
    try:
        s2.sendall(_frame(b"one") + _frame(b"two") + bad)
        assert rx.recv_bytes_many(10, timeout=10) == [b"one", b"two"]
        corrupt = bad.startswith(b"\xff")
        expected = hyperpipe.ProtocolError if corrupt else hyperpipe.MessageTooLongError
        with pytest.raises(expected):
            rx.recv_bytes_many(10, timeout=10)
        with pytest.raises(expected):
            rx.recv_bytes(timeout=10)
    finally:
        rx.close()
        s2.close()
