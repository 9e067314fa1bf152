"""The socket transport's fast paths: a frame not yet started is read with one call for the
header and one for a small body, and a small frame is written with one call. Each falls
back to the general state machine when a read or write falls short; these tests make
them fall short at every byte and check that nothing is lost, duplicated or read ahead.
"""

from __future__ import annotations

import gc
import inspect
import multiprocessing
import multiprocessing.connection
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
import weakref
from typing import Any

import pytest

import helpers
import hyperpipe
from hyperpipe import _framing, _socket_transport


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


def _payload(shape: str) -> bytes:
    """A payload of each size class the receive paths tell apart."""
    return {
        "small": helpers.pattern(23),
        "empty": b"",
        "long_header": helpers.pattern(9),
        "past_small_frame": helpers.pattern(_socket_transport._SMALL_FRAME + 7),
    }[shape]


@pytest.mark.parametrize("kind", ["socketpair", "pipe"])
@pytest.mark.parametrize("call", ["recv_bytes", "recv", "recv_bytes_into"])
@pytest.mark.parametrize("shape", ["small", "empty", "long_header", "past_small_frame"])
def test_a_frame_cut_at_every_byte_still_arrives_whole(kind: str, call: str, shape: str) -> None:
    payload = _payload(shape)
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


def _small_send_buffer_pair() -> tuple[Any, Any]:
    """A socket Pipe whose first end's send buffer takes only a few KiB."""
    a, b = hyperpipe.Pipe(transport="socket")
    a._transport._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return a, b


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
    a, b = _small_send_buffer_pair()
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


# -- the C fast path (_core.SocketFast): send_bytes(buf) and recv_bytes() with no other
# argument on a plain socket. Every test below runs on it and on the pure-Python path
# (what a build without a compiler uses); `path` says which, and checks it is in use.


@pytest.fixture(params=["c", "python"])
def path(request: Any, monkeypatch: Any) -> str:
    if request.param == "c":
        if _socket_transport._core is None:
            pytest.skip("the C core is not built")
    else:
        monkeypatch.setattr(_socket_transport, "C_FAST_PATH", False)
    return request.param


def _uses(conn: Any, path: str) -> bool:
    """Whether conn's send_bytes, recv_bytes, send and recv are those of ``path``."""
    in_c = type(conn.recv_bytes).__name__ == "builtin_function_or_method"
    kind = type(conn.recv_bytes)
    return in_c == (path == "c") and all(type(m) is kind for m in (conn.send_bytes, conn.send, conn.recv))


def _tcp_pair() -> tuple[Any, Any]:
    from hyperpipe._listener import loopback_pair

    return loopback_pair("AF_INET", b"fast-path key", stdlib=False)


@pytest.mark.parametrize("kind", ["socketpair", "tcp"])
def test_every_size_arrives_whole_and_in_order(path: str, kind: str) -> None:
    """Around each limit of the fast path (a frame copied whole up to 1 KiB, sent at all
    up to 16 KiB, read with one call up to 64 KiB): sizes it takes and sizes it hands on,
    mixed with other calls."""
    a, b = hyperpipe.Pipe(transport="socket") if kind == "socketpair" else _tcp_pair()
    assert _uses(a, path) and _uses(b, path)
    sizes = [0, 1, 4, 100, 1024, 1025, 16_383, 16_384, 16_385, 65_535, 65_536, 65_537, 300_000]
    try:
        for round_ in range(3):
            sent = [helpers.pattern(n, seed=n + round_) for n in sizes]
            sender = threading.Thread(
                target=lambda: [a.send_bytes(p) for p in sent] + [a.send(("obj", round_))]
            )
            sender.start()
            assert [b.recv_bytes() for _ in sent] == sent
            assert b.recv() == ("obj", round_)
            sender.join(10)
            b.send_bytes(bytearray(b"back"))
            b.send_bytes(memoryview(b"xbackx")[1:-1])
            assert a.recv_bytes() == b"back" and a.recv_bytes(timeout=10) == b"back"
    finally:
        a.close()
        b.close()


def test_only_plain_sockets_without_a_size_limit_get_it() -> None:
    if _socket_transport._core is None:
        pytest.skip("the C core is not built")
    a, b = hyperpipe.Pipe(transport="socket")
    r, w = hyperpipe.Pipe(duplex=False, transport="socket")
    s1, s2 = socket.socketpair()
    limited = hyperpipe.Connection(_socket_transport.SocketTransport(sock=s1, max_message_size=10))
    try:
        assert _uses(a, "c") and _uses(b, "c")
        # the C methods carry the Connection's signatures
        assert list(inspect.signature(a.send_bytes).parameters) == ["buf", "offset", "size", "timeout"]
        assert list(inspect.signature(b.recv_bytes).parameters) == ["maxlength", "timeout"]
        assert _uses(r, "python") and _uses(w, "python")  # a pipe end waits in poll()
        assert _uses(limited, "python")
    finally:
        for conn in (a, b, r, w, limited):
            conn.close()
        s2.close()


def test_without_the_core_the_python_path_serves(monkeypatch: Any) -> None:
    monkeypatch.setattr(_socket_transport, "_core", None)
    a, b = hyperpipe.Pipe(transport="socket")
    try:
        assert _uses(a, "python") and _uses(b, "python")
        a.send_bytes(b"plain python")
        assert b.recv_bytes() == b"plain python"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("call", ["recv_bytes", "recv"])
@pytest.mark.parametrize("shape", ["small", "empty", "long_header", "past_small_frame", "oob"])
def test_a_blocking_receive_of_a_frame_cut_anywhere(path: str, shape: str, call: str) -> None:
    """No timeout: the header read waits; whatever arrives short (part of the header,
    part of the payload), a big or special header: the frame comes whole, then the next."""
    a, b = hyperpipe.Pipe(transport="socket")
    assert _uses(b, path)
    if shape == "oob":  # an out-of-band frame, as a hyperpipe peer sends a big array
        numpy = pytest.importorskip("numpy")
        value = numpy.arange(10_000, dtype=numpy.float64)
        stream, buffers = _socket_transport._framing.dumps_oob(value)
        frame = b"".join(bytes(v) for v in _socket_transport._framing.oob_views(stream, buffers))
        expected = pickle.dumps(value, 5)
    else:
        payload = _payload(shape)
        if call == "recv":  # the payload pickled: recv() gives the bytes back
            payload = pickle.dumps(payload)
        frame, expected = _frame(payload, long=shape == "long_header"), payload
    cuts = list(range(1, min(len(frame), 40))) + [len(frame) // 2, len(frame) - 1]
    raw = a.fileno()
    try:
        for cut in sorted(set(cuts)):
            _write_all(raw, frame[:cut])

            def rest(cut: int = cut) -> None:
                time.sleep(0.002)  # the receive is waiting in its read by now, usually
                _write_all(raw, frame[cut:] + _frame(b"next"))

            writer = threading.Thread(target=rest)
            writer.start()
            got = b.recv_bytes() if call == "recv_bytes" else b.recv()
            if shape == "oob":
                got = got if call == "recv" else pickle.loads(got)
                assert got.tolist() == value.tolist(), f"cut at byte {cut}"
            else:
                assert got == (expected if call == "recv_bytes" else pickle.loads(expected)), f"cut at byte {cut}"
            assert b.recv_bytes() == b"next"
            writer.join(10)
    finally:
        a.close()
        b.close()


def test_end_of_stream_after_all_data(path: str) -> None:
    a, b = hyperpipe.Pipe(transport="socket")
    assert _uses(b, path)
    try:
        a.send_bytes(b"last")
        a.close()
        assert b.recv_bytes() == b"last"
        with pytest.raises(hyperpipe.PeerClosedError):
            b.recv_bytes()
    finally:
        b.close()


@pytest.mark.parametrize(
    "written, then_close, error",
    [
        (_frame(b"0123456789")[:7], True, hyperpipe.TruncatedMessageError),
        (struct.pack("!i", -7) + _frame(b"after"), False, hyperpipe.ProtocolError),
    ],
    ids=["ended-inside-a-frame", "corrupt-header"],
)
def test_a_broken_stream_stays_broken(path: str, written: bytes, then_close: bool, error: Any) -> None:
    a, b = hyperpipe.Pipe(transport="socket")
    assert _uses(b, path)
    try:
        _write_all(a.fileno(), written)
        if then_close:
            a.close()
        for _ in range(2):
            with pytest.raises(error):
                b.recv_bytes()
    finally:
        a.close()
        b.close()


def _bound_methods(sender: Any, receiver: Any) -> list:
    """A call of each fast method, kept without its Connection: bytes, a flat and a
    non-flat object (pickled in C, and by the Connection)."""
    send_bytes, send, recv_bytes, recv = sender.send_bytes, sender.send, receiver.recv_bytes, receiver.recv
    return [lambda: send_bytes(b"x"), lambda: send((1, "x")), lambda: send({1: 2}), recv_bytes, recv]


def test_a_bound_method_kept_after_close_or_death_raises_closed(path: str) -> None:
    a, b = hyperpipe.Pipe(transport="socket")
    calls = _bound_methods(a, b)
    a.close()
    b.close()
    for call in calls:
        with pytest.raises(hyperpipe.ConnectionClosedError):
            call()
    if path == "python":
        return  # a bound method of the Connection keeps it alive
    c, d = hyperpipe.Pipe(transport="socket")
    calls = _bound_methods(c, d)
    del c, d  # the Connections die (and close) though the C methods live on
    for call in calls:
        with pytest.raises(hyperpipe.ConnectionClosedError):
            call()


class _Interrupted(Exception):
    pass


@pytest.fixture
def sigusr1() -> Any:
    """Install a SIGUSR1 handler (``raising[0]``: it raises _Interrupted) and return
    (poke, raising): poke(delay) signals the main thread from another thread."""
    raising = [False]

    def handler(signum: int, frame: Any) -> None:
        if raising[0]:
            raising[0] = False
            raise _Interrupted()

    old = signal.signal(signal.SIGUSR1, handler)
    main = threading.get_ident()
    pokers: list[threading.Thread] = []

    def poke(delay: float) -> None:
        def run() -> None:
            time.sleep(delay)
            signal.pthread_kill(main, signal.SIGUSR1)

        pokers.append(threading.Thread(target=run, daemon=True))
        pokers[-1].start()

    yield poke, raising
    for thread in pokers:
        thread.join(10)
    signal.signal(signal.SIGUSR1, old)


@pytest.mark.parametrize("raises", [True, False])
@pytest.mark.parametrize("before", [b"", b"\x00\x00"])  # nothing of the frame, or part of it
@pytest.mark.parametrize("call", ["recv_bytes", "recv"])
def test_a_signal_during_a_blocked_receive(
    path: str, sigusr1: Any, raises: bool, before: bytes, call: str
) -> None:
    """A handler that raises ends the receive (what came of the frame is kept); one that
    does not lets it go on waiting. Either way the next receive gets the frame whole."""
    poke, raising = sigusr1
    a, b = hyperpipe.Pipe(transport="socket")
    assert _uses(b, path)
    receive = getattr(b, call)
    message = b"after the signal"
    frame = _frame(message if call == "recv_bytes" else pickle.dumps(message))
    try:
        _write_all(a.fileno(), before)
        raising[0] = raises
        poke(0.2)
        if raises:
            with pytest.raises(_Interrupted):
                receive()
            _write_all(a.fileno(), frame[len(before) :])
        else:
            writer = threading.Timer(0.5, _write_all, (a.fileno(), frame[len(before) :]))
            writer.start()
        assert receive() == message
        a.send_bytes(b"and the next")
        assert b.recv_bytes() == b"and the next"
    finally:
        a.close()
        b.close()


def test_a_send_cut_by_a_signal_is_finished(path: str, sigusr1: Any) -> None:
    """A small frame larger than the socket's buffer, the peer not reading yet: a signal
    interrupts the blocked write part way; the rest follows, never a cut frame."""
    poke, _ = sigusr1
    a, b = _small_send_buffer_pair()
    assert _uses(a, path)
    payloads = [helpers.pattern(16_000, seed=i) for i in range(4)]
    got: list[bytes] = []
    reader = threading.Timer(1.0, lambda: got.extend(b.recv_bytes(timeout=10) for _ in payloads))
    try:
        reader.start()
        for i, payload in enumerate(payloads):
            poke(0.1 + 0.2 * i)
            a.send_bytes(payload)
        reader.join(20)
        assert got == payloads
    finally:
        reader.cancel()
        a.close()
        b.close()


@pytest.mark.parametrize("spin_us", [None, 3_000_000])  # the default window; a 3 s spin
@pytest.mark.parametrize("call", ["recv_bytes", "recv"])
def test_close_wakes_a_blocked_c_receive(path: str, run_in_thread: Any, call: str, spin_us: Any) -> None:
    """close() from another thread ends a receive blocked in read(), or still spinning."""
    rx, tx = hyperpipe.Pipe(transport="socket", **({} if spin_us is None else {"spin_us": spin_us}))
    assert _uses(rx, path)
    fd = rx.fileno()
    try:
        started = threading.Event()

        def blocked() -> None:
            started.set()
            getattr(rx, call)()

        waiter = run_in_thread(blocked)
        assert started.wait(10)
        time.sleep(0.2)
        assert waiter.is_alive()
        rx.close()
        waiter.join(2 if spin_us else 10)  # a spinning one before its spin would have ended
        assert not waiter.is_alive(), "close() did not wake the receiver"
        assert [type(e) for e in waiter.errors] == [hyperpipe.ConnectionClosedError]
        with pytest.raises(OSError):
            os.fstat(fd)  # released by the receive on its way out
    finally:
        tx.close()


def test_close_lets_a_blocked_c_send_finish_its_frame(path: str, run_in_thread: Any) -> None:
    """The peer reads nothing: the sender blocks in its write; close() gives it the
    bound, then cuts it. The peer gets whole frames only, then the end of the stream."""
    tx, rx = hyperpipe.Pipe(transport="socket")
    assert _uses(tx, path)
    payload = helpers.pattern(10_000)
    sent = [0]

    def flood() -> None:
        while True:
            tx.send_bytes(payload)
            sent[0] += 1

    sender = run_in_thread(flood)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (sent[0] == 0 or sender.is_alive() and _progressing(sent)):
            pass
        tx.close()
        sender.join(_socket_transport.CLOSE_SEND_BOUND + 5)
        assert not sender.is_alive()
        assert len(sender.errors) == 1 and isinstance(sender.errors[0], hyperpipe.ConnectionClosedError)
        received = 0
        with pytest.raises(EOFError):
            while True:
                assert rx.recv_bytes(timeout=10) == payload
                received += 1
        assert sent[0] <= received <= sent[0] + 1  # the frame being sent: cut, or finished
    finally:
        tx.close()
        rx.close()


def _progressing(counter: list[int]) -> bool:
    """Whether the count still moves over 0.2 s (False: the sender is blocked)."""
    before = counter[0]
    time.sleep(0.2)
    return counter[0] != before


def test_threads_sharing_one_end_each_message_once(path: str) -> None:
    """Four threads receive from one end, some through the fast path, some with a
    timeout (the Connection's own method): every message arrives exactly once."""
    a, b = hyperpipe.Pipe(transport="socket")
    assert _uses(b, path)
    count = 3000
    results: list[list[bytes]] = [[] for _ in range(4)]

    def receive(mine: list[bytes], with_timeout: bool) -> None:
        while True:
            item = b.recv_bytes(timeout=20) if with_timeout else b.recv_bytes()
            if item == b"stop":
                return
            mine.append(item)

    threads = [
        threading.Thread(target=receive, args=(results[i], i % 2 == 1), daemon=True) for i in range(4)
    ]
    for thread in threads:
        thread.start()
    try:
        for i in range(count):
            a.send_bytes(b"%d" % i + b"." * (i % 300))
        for _ in threads:
            a.send_bytes(b"stop")
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)
        got = sorted(int(item.split(b".")[0]) for mine in results for item in mine)
        assert got == list(range(count))
    finally:
        a.close()
        b.close()


def test_a_connection_cut_inside_a_big_frame_is_freed(path: str) -> None:
    # The transport keeps the error (a frame cut by its end stays broken), whose traceback
    # holds the Connection's frames: a reference cycle through the C methods the
    # Connection carries, which the garbage collector must be able to see and free, with
    # the buffer reserved for the frame.
    a, b = hyperpipe.Pipe(transport="socket")
    assert _uses(b, path)
    _write_all(a.fileno(), _frame(bytes(100_000))[:50_000])
    a.close()
    with pytest.raises(hyperpipe.TruncatedMessageError):
        b.recv_bytes(timeout=5)
    b.close()
    gone = weakref.ref(b)
    del b
    gc.collect()
    assert gone() is None



class _Int(int):
    """Not flat: a subclass, pickled by the Connection (a reducer may take part)."""


# Objects of each kind send(obj)/recv() tell apart: pickled in C (a scalar of an exact type,
# a tuple or list of up to 16 of them) or by the Connection (anything else); pickles past
# the 16 KiB send limit and past the 64 KiB receive limit, which the general path finishes.
_OBJECTS = [
    0, -(1 << 70), 3.25, True, None, "ünïcode", b"raw", (), [], (42, "hello", 3.14),
    list(range(16)), list(range(17)), ((1, 2), 3), {"a": 1}, bytearray(b"abc"), _Int(5),
    "s" * 20_000, ("t" * 70_000, 1),
]  # fmt: skip


@pytest.mark.parametrize("kind", ["socketpair", "tcp"])
def test_objects_of_every_kind_arrive_equal_and_in_order(path: str, kind: str) -> None:
    a, b = hyperpipe.Pipe(transport="socket") if kind == "socketpair" else _tcp_pair()
    assert _uses(a, path) and _uses(b, path)
    try:
        sender = threading.Thread(target=lambda: [a.send(obj) for obj in _OBJECTS])
        sender.start()
        got = [b.recv() for _ in _OBJECTS]
        sender.join(10)
        assert got == _OBJECTS and [type(o) for o in got] == [type(o) for o in _OBJECTS]
        for obj in _OBJECTS:  # interleaved with the other calls, one at a time
            b.send(obj)
            b.send_bytes(b"between")
            assert a.recv() == obj and a.recv_bytes() == b"between"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["socketpair", "tcp"])
def test_an_object_whose_pickle_lands_in_a_mapped_frame_buffer_arrives(path: str, kind: str) -> None:
    """A pickle of more than EAGER_ALLOC bytes is received into an anonymous mmap, not a
    bytearray: recv() unpickles that buffer too (the stress kill matrix's 64 MiB rows)."""
    a, b = hyperpipe.Pipe(transport="socket") if kind == "socketpair" else _tcp_pair()
    assert _uses(a, path) and _uses(b, path)
    big = (b"m" * (_framing.EAGER_ALLOC + 1), 7)
    try:
        sender = threading.Thread(target=lambda: (a.send(big), a.send(("after", 1))))
        sender.start()
        assert b.recv() == big
        assert b.recv() == ("after", 1)
        sender.join(10)
        assert not sender.is_alive()
    finally:
        a.close()
        b.close()


def test_objects_go_out_as_the_stdlib_pickles_them(path: str) -> None:
    """To a stdlib peer, each frame is ForkingPickler.dumps(obj) byte for byte; what it
    sends comes back equal."""
    ours, theirs = socket.socketpair()
    conn = hyperpipe.Connection(_socket_transport.SocketTransport(sock=ours))
    peer = multiprocessing.connection.Connection(theirs.detach())
    assert _uses(conn, path)
    try:
        for obj in _OBJECTS:
            conn.send(obj)
            assert peer.recv_bytes() == bytes(multiprocessing.reduction.ForkingPickler.dumps(obj))
            peer.send(obj)
            assert conn.recv() == obj
    finally:
        conn.close()
        peer.close()


def test_an_object_waits_behind_a_parked_frame() -> None:
    """A flat object sent while a frame is parked goes out after it, whole."""
    a, b = _small_send_buffer_pair()
    big = helpers.pattern(300_000)
    got: list[Any] = []
    reader = threading.Timer(0.5, lambda: got.extend((b.recv_bytes(timeout=10), b.recv(timeout=10))))
    try:
        a.send_bytes(big, timeout=0.0)  # more than the socket takes: the rest is parked
        assert a.send_backlog() > 0
        reader.start()  # drains the parked frame only now: send() is behind it
        a.send(("after", 1))
        reader.join(20)
        assert got == [big, ("after", 1)]
    finally:
        reader.cancel()
        a.close()
        b.close()


def test_a_connection_with_a_codec_keeps_its_own_send_and_recv() -> None:
    if _socket_transport._core is None:
        pytest.skip("the C core is not built")
    from hyperpipe._codecs import get_codec

    s1, s2 = socket.socketpair()
    codec = get_codec("json")
    a = hyperpipe.Connection(_socket_transport.SocketTransport(sock=s1), codec=codec)
    b = hyperpipe.Connection(_socket_transport.SocketTransport(sock=s2), codec=codec)
    try:
        for conn in (a, b):  # bytes in C; objects through the codec
            assert type(conn.send_bytes).__name__ == "builtin_function_or_method"
            assert type(conn.send).__name__ == type(conn.recv).__name__ == "method"
        a.send([1, "two"])
        assert b.recv_bytes() == codec.dumps([1, "two"])
        b.send((3, "four"))
        assert a.recv() == [3, "four"]
    finally:
        a.close()
        b.close()


_RECEIVING: list[Any] = []


def _receive_while_unpickled() -> Any:
    return ("inner", _RECEIVING[0].recv())


class _ReceivesWhenUnpickled:
    def __reduce__(self) -> tuple:
        return _receive_while_unpickled, ()


def test_recv_unpickles_with_no_lock_held() -> None:
    """In C, recv() unpickles after letting go of the Connection's lock and the gate, so
    unpickling never holds up the next receive: here it is itself a receive."""
    if _socket_transport._core is None:
        pytest.skip("the C core is not built")
    a, b = hyperpipe.Pipe(transport="socket")
    _RECEIVING[:] = [b]
    try:
        a.send(_ReceivesWhenUnpickled())
        a.send((1, "next"))
        assert b.recv() == ("inner", (1, "next"))
    finally:
        _RECEIVING.clear()
        a.close()
        b.close()


# -- the receiver's spin before it blocks (sf_recv_frame in _core.c) --------------------


def _needs_core() -> None:
    if _socket_transport._core is None:
        pytest.skip("the C core is not built")


def test_a_socket_pipe_spins_by_default_and_spin_us_sets_it() -> None:
    _needs_core()
    pairs = [
        hyperpipe.Pipe(transport="socket"),
        hyperpipe.Pipe(transport="socket", spin_us=7),
        hyperpipe.Pipe(transport="socket", spin_us=0),
    ]
    tcp = _tcp_pair()
    try:
        for (a, b), want in zip(pairs, [_socket_transport.SPIN_US, 7, 0]):
            for end in (a, b):
                assert end._fast.spin_max_ns == end._fast.spin_ns == want * 1000
                assert end._transport.reduce()[1][3] == want  # a child's copy spins alike
        for end in tcp:  # Listener/Client with a peer on this host (loopback) spin too
            assert end._fast.spin_max_ns == _socket_transport.SPIN_US * 1000
        with pytest.raises(ValueError):
            hyperpipe.Pipe(transport="socket", spin_us=-1)
        with pytest.raises(TypeError):
            hyperpipe.Pipe(transport="socket", ring_bytes=1 << 20)  # still shm-only
    finally:
        for conn in [c for pair in pairs for c in pair] + list(tcp):
            conn.close()


class _FakeSocket:
    def __init__(self, family: Any, peer: Any) -> None:
        self.family, self._peer = family, peer

    def getpeername(self) -> Any:
        if isinstance(self._peer, Exception):
            raise self._peer
        return self._peer


@pytest.mark.parametrize("family, peer, local", [
    (socket.AF_UNIX, "", True),
    (socket.AF_INET, ("127.0.0.1", 5000), True),
    (socket.AF_INET, ("127.3.4.5", 5000), True),
    (socket.AF_INET6, ("::1", 5000, 0, 0), True),
    (socket.AF_INET6, ("::ffff:127.0.0.1", 5000, 0, 0), True),
    (socket.AF_INET, ("10.1.2.3", 5000), False),
    (socket.AF_INET6, ("fe80::1%eth0", 5000, 0, 2), False),
    (socket.AF_INET, OSError(107, "not connected"), False),
])
def test_only_a_peer_on_this_host_makes_a_connection_spin(family: Any, peer: Any, local: bool) -> None:
    assert _socket_transport._peer_on_this_host(_FakeSocket(family, peer)) is local


@pytest.mark.parametrize("call", ["recv_bytes", "recv"])
def test_the_spin_window_adapts(call: str) -> None:
    """Halved after a long wait (down to 2 us), doubled back after a frame it caught."""
    _needs_core()
    a, b = hyperpipe.Pipe(transport="socket", spin_us=40)
    send = a.send_bytes if call == "recv_bytes" else a.send
    receive = getattr(b, call)
    message = b"late" if call == "recv_bytes" else ("late", 1)
    try:
        for want in (20_000, 10_000, 5_000, 2_500, 2_000, 2_000):
            timer = threading.Timer(0.05, send, (message,))
            timer.start()
            assert receive() == message
            timer.join()
            assert b._fast.spin_ns == want
        for want in (4_000, 8_000, 16_000, 32_000, 40_000):
            send(message)
            assert receive() == message
            assert b._fast.spin_ns == want
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("call", ["recv_bytes", "recv"])
def test_a_frame_sent_during_the_spin_is_caught(call: str, run_in_thread: Any) -> None:
    _needs_core()
    a, b = hyperpipe.Pipe(transport="socket", spin_us=5_000_000)  # 5 s
    payload = helpers.pattern(3000)
    send = a.send_bytes if call == "recv_bytes" else a.send
    try:
        sender = run_in_thread(lambda: (time.sleep(0.1), send(payload)))
        assert getattr(b, call)() == payload
        sender.join(10)
        assert b._fast.spin_ns == 5_000_000_000  # caught: the window stays full
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("raises", [True, False])
@pytest.mark.parametrize("call", ["recv_bytes", "recv"])
def test_a_signal_during_the_spin_is_handled_before_the_read_blocks(
    sigusr1: Any, raises: bool, call: str
) -> None:
    """The signal comes while the receive spins (so no read() is there to be interrupted):
    its handler runs when the spin ends; one that raises ends the receive, as it would
    end a blocked read, and one that does not lets the receive wait on."""
    _needs_core()
    poke, raising = sigusr1
    a, b = hyperpipe.Pipe(transport="socket", spin_us=1_000_000)  # 1 s
    message = b"after the signal"
    send = a.send_bytes if call == "recv_bytes" else a.send
    try:
        raising[0] = raises
        poke(0.2)
        if raises:
            with pytest.raises(_Interrupted):
                getattr(b, call)()
        else:
            writer = threading.Timer(1.5, send, (message,))
            writer.start()
            assert getattr(b, call)() == message
            writer.join()
        send(b"and the next")
        assert getattr(b, call)() == b"and the next"
    finally:
        a.close()
        b.close()
