"""hyperpipe beyond the standard library: timeouts, thread safety, close from another thread.

All of these are deliberate differences (the stdlib has no ``timeout=`` keywords, corrupts
frames when threads share a Connection, and cannot wake a thread blocked in ``recv``), so
they are skipped for the ``multiprocessing`` implementation with the reason shown.
"""

from __future__ import annotations

import builtins
import multiprocessing
import os
import pickle
import struct
import threading
import time

import pytest

import helpers
from helpers import CLOCK_RES

TIMEOUT_REASON = "timeout= keywords are hyperpipe-only (the stdlib has none)"
THREADS_REASON = "the stdlib Connection is not thread-safe: concurrent senders interleave frames"
CLOSE_REASON = "the stdlib cannot wake a thread blocked in recv/send when another thread closes"


@pytest.fixture
def duplex(impl):
    a, b = impl.Pipe()
    yield a, b
    a.close()
    b.close()


@pytest.mark.deliberate_difference(TIMEOUT_REASON)
def test_timeout_error_is_the_builtin_and_multiprocessing_one(impl):
    assert issubclass(impl.TimeoutError, builtins.TimeoutError)
    assert issubclass(impl.TimeoutError, multiprocessing.TimeoutError)


@pytest.mark.deliberate_difference(TIMEOUT_REASON)
def test_timeouts_are_keyword_only(duplex):
    a, b = duplex
    b.send_bytes(b"x")
    with pytest.raises(TypeError):
        a.recv(0.1)
    with pytest.raises(TypeError):
        a.recv_bytes(10, 0.1)
    with pytest.raises(TypeError):
        a.recv_bytes_into(bytearray(4), 0, 0.1)
    with pytest.raises(TypeError):
        b.send("x", 0.1)
    assert a.recv_bytes() == b"x"


@pytest.mark.deliberate_difference(TIMEOUT_REASON)
@pytest.mark.parametrize("call", ["recv", "recv_bytes", "recv_bytes_into"])
def test_recv_timeout_raises_and_the_connection_stays_usable(impl, duplex, call):
    a, b = duplex
    receive = {
        "recv": lambda **kw: a.recv(**kw),
        "recv_bytes": lambda **kw: a.recv_bytes(**kw),
        "recv_bytes_into": lambda **kw: a.recv_bytes_into(bytearray(100), **kw),
    }[call]
    with pytest.raises(impl.TimeoutError):
        receive(timeout=0)
    start = time.monotonic()
    with pytest.raises(builtins.TimeoutError):
        receive(timeout=0.2)
    assert time.monotonic() - start >= 0.2 - CLOCK_RES
    b.send("after the timeout")
    assert a.recv(timeout=5) == "after the timeout"


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@pytest.mark.deliberate_difference(TIMEOUT_REASON)
@pytest.mark.parametrize("call", ["recv", "recv_bytes", "recv_bytes_into"])
@pytest.mark.parametrize("split", ["in_header", "in_body"])
def test_recv_timeout_keeps_a_partly_arrived_message(impl, duplex, call, split):
    """Write half a frame straight to the socket (stdlib wire format), time out, finish it."""
    if impl.transport != "socket":
        pytest.skip("writes raw stdlib-format frames into the socket; other transports: see below")
    a, b = duplex
    payload = pickle.dumps({"whole": helpers.pattern(5000)}) if call == "recv" else helpers.pattern(5000)
    frame = struct.pack("!i", len(payload)) + payload
    cut = 2 if split == "in_header" else 2500
    _write_all(b.fileno(), frame[:cut])
    buf = bytearray(6000)
    receive = {
        "recv": lambda **kw: a.recv(**kw),
        "recv_bytes": lambda **kw: a.recv_bytes(**kw),
        "recv_bytes_into": lambda **kw: a.recv_bytes_into(buf, 7, **kw),
    }[call]
    for _ in range(2):
        with pytest.raises(impl.TimeoutError):
            receive(timeout=0.05)
    _write_all(b.fileno(), frame[cut:])
    # the rest arrived: the message is reported ready, by poll and by both waits
    assert a.poll(5)
    assert impl.wait([a], 5) == [a]
    got = receive(timeout=5)
    if call == "recv":
        assert got == {"whole": helpers.pattern(5000)}
    elif call == "recv_bytes":
        assert got == payload
    else:
        assert got == len(payload) and bytes(buf[7 : 7 + len(payload)]) == payload
    b.send("next")
    assert a.recv(timeout=5) == "next"


@pytest.mark.deliberate_difference(TIMEOUT_REASON)
@pytest.mark.parametrize("call", ["recv", "recv_bytes", "recv_bytes_into"])
def test_recv_timeouts_during_a_big_message_lose_nothing(duplex, run_in_thread, call):
    """Tiny timeouts while a 32 MiB message streams in: retries get it whole.

    (Whether a timeout lands mid-message depends on scheduling; the socket-only test above
    makes that case deterministic.)
    """
    a, b = duplex
    size = 32 * 1024 * 1024
    data = helpers.pattern(size)
    buf = bytearray(size)

    first_timeout = threading.Event()

    def send_later():
        first_timeout.wait(30)  # start only once the receiver has timed out at least once
        if call == "recv":
            b.send(data)
        else:
            b.send_bytes(data)

    sender = run_in_thread(send_later)
    timeouts = 0
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "message did not arrive within 60 s"
        try:
            if call == "recv":
                got = a.recv(timeout=0.001)
            elif call == "recv_bytes":
                got = a.recv_bytes(timeout=0.001)
            else:
                got = a.recv_bytes_into(buf, timeout=0.001)
            break
        except builtins.TimeoutError:
            timeouts += 1
            first_timeout.set()
    sender.join(30)
    assert not sender.errors
    assert timeouts >= 1
    if call == "recv_bytes_into":
        assert got == size and buf == data
    else:
        assert got == data


@pytest.mark.deliberate_difference(TIMEOUT_REASON)
def test_send_timeout_never_leaves_half_a_frame(impl, duplex, run_in_thread):
    a, b = duplex
    filler = helpers.pattern(65536)
    sent_fillers = 0
    for _ in range(4096):  # 256 MiB: a bounded transport must push back well before
        try:
            b.send_bytes(filler, timeout=0.05)
        except impl.TimeoutError:
            break
        sent_fillers += 1
    else:
        pytest.fail("send_bytes never blocked: is the send buffer unbounded?")
    big = helpers.pattern(1 << 20, seed=3)
    outcomes = {}
    for name, call in (
        ("big", lambda: b.send_bytes(big, timeout=0.2)),
        ("object", lambda: b.send({"obj": big}, timeout=0.05)),
    ):
        try:
            call()
            outcomes[name] = "sent"
        except builtins.TimeoutError:
            outcomes[name] = "timed out"
    sender = run_in_thread(b.send_bytes, b"marker")  # blocks until the reader drains
    received = []
    while True:
        msg = a.recv_bytes(timeout=30)
        if msg == b"marker":
            break
        received.append(msg)
    sender.join(30)
    assert not sender.errors
    assert received[:sent_fillers] == [filler] * sent_fillers
    # a send that raised TimeoutError delivered nothing; one that returned delivered it all
    expected_rest = []
    if outcomes["big"] == "sent":
        expected_rest.append(big)
    if outcomes["object"] == "sent":
        expected_rest.append(pickle.dumps({"obj": big}))
    rest = received[sent_fillers:]
    if outcomes["object"] == "sent":
        assert pickle.loads(rest[-1]) == {"obj": big}
        rest[-1] = expected_rest[-1]
    assert len(rest) == len(expected_rest) and rest == expected_rest, outcomes
    b.send("after")
    assert a.recv(timeout=5) == "after"


@pytest.mark.deliberate_difference(THREADS_REASON)
def test_threads_share_a_connection_without_interleaving(duplex, run_in_thread):
    a, b = duplex
    n_senders, n_receivers, per_sender = 4, 3, 150
    sizes = [10, 20_000, 150_000, 300, 70_000]

    def message(sender_id, seq):
        header = struct.pack("!ii", sender_id, seq)
        return header + helpers.pattern(sizes[(sender_id + seq) % len(sizes)], seed=sender_id * 31 + seq)

    def sender(sender_id):
        for seq in range(per_sender):
            if seq % 2:
                b.send_bytes(message(sender_id, seq))
            else:
                b.send(message(sender_id, seq))  # pickled bytes: recv_bytes sees a pickle

    results = [[] for _ in range(n_receivers)]
    bad = []

    def receiver(index):
        while True:
            raw = a.recv_bytes(timeout=60)
            if raw == b"STOP":
                return
            if raw[:1] == b"\x80":  # a pickle frame (protocol >= 2)
                raw = pickle.loads(raw)
            sender_id, seq = struct.unpack("!ii", raw[:8])
            if raw != message(sender_id, seq):
                bad.append((sender_id, seq, len(raw)))
            results[index].append((sender_id, seq))

    receivers = [run_in_thread(receiver, i) for i in range(n_receivers)]
    senders = [run_in_thread(sender, i) for i in range(n_senders)]
    for thread in senders:
        thread.join(60)
        assert not thread.is_alive() and not thread.errors, thread.errors
    for _ in range(n_receivers):
        b.send_bytes(b"STOP")
    for thread in receivers:
        thread.join(60)
        assert not thread.is_alive() and not thread.errors, thread.errors
    assert bad == []
    everything = [item for per_receiver in results for item in per_receiver]
    assert sorted(everything) == [(s, q) for s in range(n_senders) for q in range(per_sender)]
    # each receiver saw each sender's messages in the order they were sent
    for per_receiver in results:
        for s in range(n_senders):
            seqs = [q for (sid, q) in per_receiver if sid == s]
            assert seqs == sorted(seqs)


@pytest.mark.deliberate_difference(THREADS_REASON)
def test_threads_send_both_ways_at_once(duplex, run_in_thread):
    a, b = duplex
    count = 300
    payload = helpers.pattern(50_000)

    def pump(conn, tag):
        for i in range(count):
            conn.send((tag, i, payload))

    def drain(conn, tag, out):
        for _ in range(count):
            out.append(conn.recv(timeout=60))

    got_a, got_b = [], []
    threads = [
        run_in_thread(pump, a, "from a"),
        run_in_thread(pump, b, "from b"),
        run_in_thread(drain, a, "at a", got_a),
        run_in_thread(drain, b, "at b", got_b),
    ]
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive() and not thread.errors, thread.errors
    assert got_b == [("from a", i, payload) for i in range(count)]
    assert got_a == [("from b", i, payload) for i in range(count)]


@pytest.mark.deliberate_difference(CLOSE_REASON)
@pytest.mark.parametrize("blocked_in", ["recv", "recv_bytes", "recv_bytes_into", "poll", "send_bytes"])
def test_close_from_another_thread_wakes_a_blocked_call(impl, duplex, run_in_thread, blocked_in):
    a, b = duplex
    if blocked_in == "send_bytes":
        filler = helpers.pattern(65536)
        for _ in range(4096):
            try:
                a.send_bytes(filler, timeout=0.05)
            except impl.TimeoutError:
                break
    calls = {
        "recv": lambda: a.recv(),
        "recv_bytes": lambda: a.recv_bytes(),
        "recv_bytes_into": lambda: a.recv_bytes_into(bytearray(10)),
        "poll": lambda: a.poll(None),
        "send_bytes": lambda: a.send_bytes(helpers.pattern(4 << 20)),
    }
    started = threading.Event()

    def blocked():
        started.set()
        calls[blocked_in]()

    thread = run_in_thread(blocked)
    assert started.wait(10)
    time.sleep(0.2)  # let it block
    assert thread.is_alive(), f"{blocked_in} returned early: {thread.errors}"
    a.close()
    thread.join(10)
    assert not thread.is_alive(), f"close() did not wake the thread blocked in {blocked_in}"
    assert len(thread.errors) == 1
    error = thread.errors[0]
    assert isinstance(error, OSError) and not isinstance(error, EOFError), repr(error)
    assert a.closed
    # the peer is unaffected until it sees the end of the stream
    assert b.poll(5)
