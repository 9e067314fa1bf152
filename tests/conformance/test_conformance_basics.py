"""In-process behaviour of Pipe/Connection, asserted identically for the stdlib and hyperpipe.

Every expectation here was first observed on ``multiprocessing.Pipe`` (CPython 3.11, Linux);
a test that fails only for hyperpipe is a drop-in incompatibility.
"""

from __future__ import annotations

import array
import gc
import multiprocessing
import multiprocessing.connection
import pickle
import re
import select
import threading
import time

import pytest

import helpers
from helpers import CLOCK_RES

DIRECTIONS = ["duplex", "oneway"]


def pipe_pair(impl, direction):
    """(receiving end, sending end) for either kind of pipe."""
    if direction == "duplex":
        a, b = impl.Pipe()
        return a, b
    reader, writer = impl.Pipe(duplex=False)
    return reader, writer


@pytest.fixture(params=DIRECTIONS)
def ends(request, impl):
    rx, tx = pipe_pair(impl, request.param)
    yield rx, tx
    rx.close()
    tx.close()


@pytest.fixture
def duplex(impl):
    a, b = impl.Pipe()
    yield a, b
    a.close()
    b.close()


# -- Pipe and the Connection objects ------------------------------------------------------


def test_pipe_returns_two_connections_of_the_public_class(impl):
    for duplex_flag in (True, False):
        a, b = impl.Pipe(duplex_flag)
        with a, b:
            assert isinstance(a, impl.Connection)
            assert isinstance(b, impl.Connection)
            assert a is not b


def test_flags_of_duplex_and_oneway_ends(impl):
    a, b = impl.Pipe()
    with a, b:
        assert (a.readable, a.writable, a.closed) == (True, True, False)
        assert (b.readable, b.writable, b.closed) == (True, True, False)
    reader, writer = impl.Pipe(duplex=False)
    with reader, writer:
        assert (reader.readable, reader.writable) == (True, False)
        assert (writer.readable, writer.writable) == (False, True)


def test_duplex_keyword_and_positional(impl):
    reader, writer = impl.Pipe(False)
    with reader, writer:
        assert not reader.writable and not writer.readable
    a, b = impl.Pipe(duplex=True)
    with a, b:
        a.send(1)
        b.send(2)
        assert (b.recv(), a.recv()) == (1, 2)


# -- objects and bytes ----------------------------------------------------------------------


OBJECTS = [
    None,
    0,
    -(2**70),
    3.5,
    "text ü",
    b"",
    b"bytes",
    bytearray(b"ba"),
    (1, (2, [3, {4: 5}])),
    {"k": [1.0, None, frozenset({1, 2})]},
    list(range(10_000)),
    helpers.UnpicklableError("an exception instance"),
]


def test_send_recv_objects_in_order(ends):
    rx, tx = ends
    for obj in OBJECTS:
        tx.send(obj)
        got = rx.recv()
        if isinstance(obj, Exception):
            assert type(got) is type(obj) and got.args == obj.args
        else:
            assert got == obj and type(got) is type(obj)
    # several queued before reading: order kept
    for i in range(100):
        tx.send(i)
    assert [rx.recv() for _ in range(100)] == list(range(100))


def test_send_bytes_recv_bytes(ends, run_in_thread):
    rx, tx = ends
    for payload in (b"", b"x", helpers.pattern(16384), helpers.pattern(16385), helpers.pattern(1 << 20)):
        sender = run_in_thread(tx.send_bytes, payload)  # big ones do not fit in the pipe
        got = rx.recv_bytes()
        sender.join(30)
        assert not sender.errors
        assert type(got) is bytes
        assert got == payload


def test_send_bytes_accepts_any_buffer(duplex):
    a, b = duplex
    b.send_bytes(bytearray(b"abc"))
    b.send_bytes(memoryview(b"xabcx")[1:4])
    ints = array.array("i", range(10))
    b.send_bytes(ints)  # sent as its raw bytes
    assert a.recv_bytes() == b"abc"
    assert a.recv_bytes() == b"abc"
    assert a.recv_bytes() == ints.tobytes()


def test_send_bytes_offset_and_size_count_bytes(duplex):
    a, b = duplex
    b.send_bytes(b"0123456789", 2)
    b.send_bytes(b"0123456789", 2, 3)
    b.send_bytes(b"0123456789", 10)
    b.send_bytes(b"0123456789", 4, 0)
    b.send_bytes(b"0123456789", 0, 10)
    ints = array.array("i", range(10))
    b.send_bytes(ints, 4, 8)  # offset and size are in bytes, not items
    assert a.recv_bytes() == b"23456789"
    assert a.recv_bytes() == b"234"
    assert a.recv_bytes() == b""
    assert a.recv_bytes() == b""
    assert a.recv_bytes() == b"0123456789"
    assert a.recv_bytes() == ints.tobytes()[4:12]


@pytest.mark.parametrize(
    "offset, size, message",
    [
        (-1, None, "offset is negative"),
        (11, None, "buffer length < offset"),
        (0, -1, "size is negative"),
        (5, 6, "buffer length < offset + size"),
        (0, 11, "buffer length < offset + size"),
    ],
)
def test_send_bytes_bad_offset_or_size_raises_valueerror_and_sends_nothing(duplex, offset, size, message):
    a, b = duplex
    with pytest.raises(ValueError, match=re.escape(message)):
        b.send_bytes(b"0123456789", offset, size)
    assert not a.poll(0)
    b.send_bytes(b"next")
    assert a.recv_bytes() == b"next"


@pytest.mark.parametrize("not_a_buffer", ["text", 12, None, [1, 2]])
def test_send_bytes_non_buffer_raises_typeerror(duplex, not_a_buffer):
    a, b = duplex
    with pytest.raises(TypeError):
        b.send_bytes(not_a_buffer)
    assert not a.poll(0)


# -- recv_bytes(maxlength) --------------------------------------------------------------------


def test_recv_bytes_maxlength_equal_is_fine(duplex):
    a, b = duplex
    b.send_bytes(b"abcd")
    assert a.recv_bytes(4) == b"abcd"
    b.send_bytes(b"")
    assert a.recv_bytes(0) == b""
    b.send_bytes(b"abcd")
    assert a.recv_bytes(maxlength=100) == b"abcd"


def test_recv_bytes_negative_maxlength_raises_valueerror_and_keeps_the_message(duplex):
    a, b = duplex
    b.send_bytes(b"abcd")
    with pytest.raises(ValueError, match="negative maxlength"):
        a.recv_bytes(-1)
    assert a.recv_bytes() == b"abcd"


def test_recv_bytes_over_maxlength_duplex_end_stops_reading(duplex):
    a, b = duplex
    b.send_bytes(b"abcd")
    with pytest.raises(OSError, match="bad message length"):
        a.recv_bytes(3)
    # as in the stdlib: a duplex end becomes write-only, still open
    assert (a.closed, a.readable, a.writable) == (False, False, True)
    with pytest.raises(OSError, match="connection is write-only"):
        a.recv_bytes()
    a.send("still writable")
    assert b.recv() == "still writable"


def test_recv_bytes_over_maxlength_read_only_end_is_closed(impl):
    reader, writer = impl.Pipe(duplex=False)
    with reader, writer:
        writer.send_bytes(helpers.pattern(1000))
        with pytest.raises(OSError, match="bad message length"):
            reader.recv_bytes(999)
        assert reader.closed
        with pytest.raises(OSError, match="handle is closed"):
            reader.recv_bytes()


# -- recv_bytes_into --------------------------------------------------------------------------


def test_recv_bytes_into_with_offsets(duplex):
    a, b = duplex
    buf = bytearray(b"." * 10)
    b.send_bytes(b"abc")
    assert a.recv_bytes_into(buf) == 3
    b.send_bytes(b"xyz")
    assert a.recv_bytes_into(buf, 7) == 3
    assert buf == bytearray(b"abc....xyz")
    b.send_bytes(b"")
    assert a.recv_bytes_into(buf, 10) == 0  # offset == len is allowed
    big = helpers.pattern(300_000)
    target = bytearray(300_005)
    b_thread = threading.Thread(target=b.send_bytes, args=(big,))
    b_thread.start()
    assert a.recv_bytes_into(target, 5) == len(big)
    b_thread.join(30)
    assert bytes(target[5:]) == big


def test_recv_bytes_into_array_and_memoryview(duplex):
    a, b = duplex
    ints = array.array("i", [0, 0, 0, 0])
    b.send_bytes(array.array("i", [7, 8]))
    assert a.recv_bytes_into(ints, 4) == 8  # offset in bytes: lands in items 1 and 2
    assert ints.tolist() == [0, 7, 8, 0]
    raw = bytearray(6)
    b.send_bytes(b"mv")
    assert a.recv_bytes_into(memoryview(raw)[2:], 1) == 2
    assert raw == bytearray(b"\x00\x00\x00mv\x00")


def test_recv_bytes_into_too_small_raises_buffertooshort_with_whole_message(impl, duplex):
    a, b = duplex
    message = helpers.pattern(70_000)
    t = threading.Thread(target=b.send_bytes, args=(message,))
    t.start()
    buf = bytearray(100)
    with pytest.raises(impl.BufferTooShort) as info:
        a.recv_bytes_into(buf, 50)
    t.join(30)
    assert isinstance(info.value, multiprocessing.BufferTooShort)
    assert info.value.args[0] == message
    # the message was consumed; the next one is intact
    b.send_bytes(b"next")
    assert a.recv_bytes() == b"next"
    # off by one
    b.send_bytes(b"12345")
    with pytest.raises(multiprocessing.BufferTooShort) as info:
        a.recv_bytes_into(bytearray(5), 1)
    assert info.value.args[0] == b"12345"


@pytest.mark.parametrize("offset, message", [(-1, "negative offset"), (11, "offset too large")])
def test_recv_bytes_into_bad_offset_raises_valueerror_and_keeps_the_message(duplex, offset, message):
    a, b = duplex
    b.send_bytes(b"abc")
    with pytest.raises(ValueError, match=message):
        a.recv_bytes_into(bytearray(10), offset)
    assert a.recv_bytes() == b"abc"


@pytest.mark.parametrize("not_a_buffer", [12, None, "text", [0] * 8])
def test_recv_bytes_into_non_buffer_raises_typeerror_and_keeps_the_message(duplex, not_a_buffer):
    a, b = duplex
    b.send_bytes(b"abc")
    with pytest.raises(TypeError):
        a.recv_bytes_into(not_a_buffer)
    assert a.recv_bytes() == b"abc"


def test_recv_bytes_into_read_only_buffer_raises_typeerror(duplex):
    a, b = duplex
    b.send_bytes(b"abc")
    with pytest.raises(TypeError):
        a.recv_bytes_into(b"immutable buffer")


@pytest.mark.deliberate_difference(
    "recv_bytes_into(read-only buffer): the stdlib reads the message before noticing and "
    "loses it; hyperpipe checks the buffer first and loses nothing"
)
def test_recv_bytes_into_read_only_buffer_loses_nothing(duplex):
    a, b = duplex
    b.send_bytes(b"abc")
    with pytest.raises(TypeError):
        a.recv_bytes_into(b"immutable buffer")
    assert a.recv_bytes() == b"abc"


def test_recv_gives_buffers_of_its_own(duplex, run_in_thread):
    # recv() (copy=True in hyperpipe): a received array is writable and nobody else's, also
    # when it travelled out of band through shared memory.
    np = pytest.importorskip("numpy")
    a, b = duplex
    sent = np.arange(1 << 17, dtype=np.float64)  # 1 MiB: more than a socket buffer holds
    run_in_thread(b.send, sent)
    first = a.recv()
    assert first.flags.writeable and (first == sent).all()
    first[:] = -1.0
    run_in_thread(b.send, sent)
    second = a.recv()
    assert (second == sent).all() and (first == -1.0).all()


# -- poll -------------------------------------------------------------------------------------


def test_poll_zero_and_default(ends):
    rx, tx = ends
    assert rx.poll() is False
    assert rx.poll(0) is False
    assert rx.poll(-1) is False  # negative means "do not wait", as in the stdlib
    tx.send("x")
    assert rx.poll() is True
    assert rx.poll(0) is True
    assert rx.poll(0) is True  # polling does not consume
    assert rx.recv() == "x"
    assert rx.poll(0) is False


def test_poll_timeout_waits_at_least_that_long(ends):
    rx, tx = ends
    start = time.monotonic()
    assert rx.poll(0.2) is False
    assert time.monotonic() - start >= 0.2 - CLOCK_RES


def test_poll_timeout_and_none_return_when_data_arrives(ends, run_in_thread):
    rx, tx = ends

    def send_later():
        time.sleep(0.1)
        tx.send("late")

    run_in_thread(send_later)
    assert rx.poll(None) is True
    assert rx.recv() == "late"
    run_in_thread(send_later)
    assert rx.poll(30) is True
    assert rx.recv() == "late"


def test_poll_is_true_at_eof(ends):
    rx, tx = ends
    tx.send(1)
    tx.close()
    assert rx.poll(0) is True
    assert rx.recv() == 1
    assert rx.poll(0) is True  # EOF is "ready": recv will not block
    with pytest.raises(EOFError):
        rx.recv()


def test_poll_with_a_second_message_already_buffered(duplex):
    a, b = duplex
    b.send_bytes(b"one")
    b.send_bytes(b"two")
    time.sleep(0.05)
    assert a.recv_bytes() == b"one"
    # whatever was read ahead, the second message is still reported ready
    assert a.poll(0) is True
    assert a.recv_bytes() == b"two"
    assert a.poll(0) is False


def test_poll_while_another_thread_receives_answers_about_data(ends, run_in_thread):
    # poll() says whether data is there; another thread blocked in recv() does not make it
    # raise (it returns False once the timeout passes with nothing this thread could read).
    rx, tx = ends
    started = threading.Event()
    got = []

    def receive():
        started.set()
        got.append(rx.recv())

    thread = run_in_thread(receive)
    assert started.wait(10)
    time.sleep(0.1)  # let it block in recv
    assert rx.poll() is False
    start = time.monotonic()
    assert rx.poll(0.2) is False
    assert time.monotonic() - start >= 0.2 - CLOCK_RES
    tx.send("x")
    thread.join(10)
    assert got == ["x"] and not thread.errors


# -- fileno -----------------------------------------------------------------------------------


def test_fileno_is_a_selectable_descriptor(ends):
    rx, tx = ends
    assert isinstance(rx.fileno(), int) and rx.fileno() >= 0
    assert isinstance(tx.fileno(), int) and tx.fileno() >= 0
    assert rx.fileno() != tx.fileno()
    assert select.select([rx.fileno()], [], [], 0)[0] == []
    tx.send_bytes(b"one")
    tx.send_bytes(b"two")
    assert select.select([rx.fileno()], [], [], 5)[0] == [rx.fileno()]
    assert rx.recv_bytes() == b"one"
    # the descriptor stays readable while poll(0) is true
    assert rx.poll(0)
    assert select.select([rx.fileno()], [], [], 0)[0] == [rx.fileno()]


# -- close, closed handle, context manager ------------------------------------------------------


def test_close_is_idempotent_and_sets_closed(ends):
    rx, tx = ends
    rx_flags = (rx.readable, rx.writable)
    rx.close()
    rx.close()
    assert rx.closed is True
    # as in the stdlib, readable/writable keep their values after close
    assert (rx.readable, rx.writable) == rx_flags


def test_every_call_on_a_closed_connection_raises_oserror(duplex):
    a, b = duplex
    a.close()
    calls = {
        "send": lambda: a.send(1),
        "send_bytes": lambda: a.send_bytes(b"x"),
        "recv": a.recv,
        "recv_bytes": a.recv_bytes,
        "recv_bytes_into": lambda: a.recv_bytes_into(bytearray(10)),
        "poll": a.poll,
        "fileno": a.fileno,
    }
    for name, call in calls.items():
        with pytest.raises(OSError, match="handle is closed"):
            call()


def test_closed_check_comes_before_argument_checks(duplex):
    a, b = duplex
    a.close()
    with pytest.raises(OSError, match="handle is closed"):
        a.send_bytes(b"x", -1)
    with pytest.raises(OSError, match="handle is closed"):
        a.recv_bytes(-1)


def test_context_manager_closes_and_returns_self(impl):
    a, b = impl.Pipe()
    with a as entered_a, b as entered_b:
        assert entered_a is a and entered_b is b
        a.send("in block")
        assert b.recv() == "in block"
    assert a.closed and b.closed


def test_context_manager_closes_on_exception(impl):
    a, b = impl.Pipe()
    with pytest.raises(RuntimeError):
        with a, b:
            raise RuntimeError("boom")
    assert a.closed and b.closed


# -- direction ------------------------------------------------------------------------------


def test_wrong_direction_raises_oserror(impl):
    reader, writer = impl.Pipe(duplex=False)
    with reader, writer:
        with pytest.raises(OSError, match="connection is read-only"):
            reader.send(1)
        with pytest.raises(OSError, match="connection is read-only"):
            reader.send_bytes(b"x")
        with pytest.raises(OSError, match="connection is write-only"):
            writer.recv()
        with pytest.raises(OSError, match="connection is write-only"):
            writer.recv_bytes()
        with pytest.raises(OSError, match="connection is write-only"):
            writer.recv_bytes_into(bytearray(4))
        with pytest.raises(OSError, match="connection is write-only"):
            writer.poll()
        # the connection still works the right way round
        writer.send("ok")
        assert reader.recv() == "ok"


# -- end of stream and broken pipes -----------------------------------------------------------


def test_eof_after_peer_closed_and_data_read(ends):
    rx, tx = ends
    tx.send("a")
    tx.send_bytes(b"b")
    tx.close()
    assert rx.recv() == "a"
    assert rx.recv_bytes() == b"b"
    with pytest.raises(EOFError):
        rx.recv()
    with pytest.raises(EOFError):
        rx.recv_bytes()
    with pytest.raises(EOFError):
        rx.recv_bytes_into(bytearray(4))
    assert not rx.closed


@pytest.mark.parametrize("call", ["send", "send_bytes", "send_empty", "send_big"])
def test_sending_to_a_closed_peer_raises_brokenpipeerror(ends, call):
    rx, tx = ends
    rx.close()
    with pytest.raises(BrokenPipeError):
        if call == "send":
            tx.send("x")
        elif call == "send_bytes":
            tx.send_bytes(b"x")
        elif call == "send_empty":
            tx.send_bytes(b"")
        else:
            tx.send_bytes(helpers.pattern(1 << 20))


def test_gc_of_open_connections_closes_their_fds(impl):
    gc.collect()
    baseline = helpers.fd_count()
    for _ in range(20):
        a, b = impl.Pipe()
        a.send("x")
        r, w = impl.Pipe(duplex=False)
        w.send_bytes(b"y")
        del a, b, r, w
    gc.collect()
    assert helpers.fd_count() <= baseline


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gc_of_one_end_gives_eof_to_the_other(impl, direction):
    rx, tx = pipe_pair(impl, direction)
    with rx:
        tx.send("last")
        del tx
        gc.collect()
        assert rx.recv() == "last"
        with pytest.raises(EOFError):
            rx.recv()


# -- pickling errors --------------------------------------------------------------------------


def test_unpicklable_object_raises_in_send_and_sends_nothing(duplex):
    a, b = duplex
    with pytest.raises(helpers.UnpicklableError):
        b.send([helpers.pattern(200_000), helpers.FailsToPickle()])
    with pytest.raises(TypeError, match="pickle"):
        b.send(threading.Lock())
    with pytest.raises((AttributeError, pickle.PicklingError)):
        b.send(lambda: None)
    assert not a.poll(0)
    b.send("next")
    assert a.recv() == "next"


def test_message_that_fails_to_unpickle_raises_in_recv_next_is_readable(duplex):
    a, b = duplex
    b.send(helpers.FailsToUnpickle())
    b.send("next")
    with pytest.raises(ValueError, match="boom"):
        a.recv()
    assert a.recv() == "next"
    b.send_bytes(b"not a pickle")
    b.send(["still", "fine"])
    with pytest.raises(Exception):
        a.recv()
    assert a.recv() == ["still", "fine"]


# -- wait() in one process --------------------------------------------------------------------


def test_wait_returns_the_ready_connections(impl):
    a1, b1 = impl.Pipe()
    a2, b2 = impl.Pipe()
    r3, w3 = impl.Pipe(duplex=False)
    conns = [a1, a2, r3]
    try:
        assert impl.wait(conns, 0) == []
        start = time.monotonic()
        assert impl.wait(conns, 0.2) == []
        assert time.monotonic() - start >= 0.2 - CLOCK_RES
        b2.send("two")
        assert impl.wait(conns, 5) == [a2]
        w3.send("three")
        ready = impl.wait(conns, 5)
        assert set(ready) == {a2, r3}
        assert a2.recv() == "two" and r3.recv() == "three"
        b1.close()  # EOF counts as ready
        assert impl.wait(conns, 5) == [a1]
        assert impl.wait([], 0) == []
    finally:
        for c in (a1, b1, a2, b2, r3, w3):
            c.close()


def test_wait_none_blocks_until_ready(impl, run_in_thread):
    a, b = impl.Pipe()
    with a, b:

        def send_later():
            time.sleep(0.1)
            b.send("late")

        run_in_thread(send_later)
        assert impl.wait([a]) == [a]
        assert impl.wait([a], None) == [a]
        assert a.recv() == "late"


def test_stdlib_wait_accepts_the_connections(impl):
    # drop-in users may keep `from multiprocessing.connection import wait`
    a, b = impl.Pipe()
    with a, b:
        assert multiprocessing.connection.wait([a], 0) == []
        b.send("x")
        assert multiprocessing.connection.wait([a], 5) == [a]
        assert a.recv() == "x"
