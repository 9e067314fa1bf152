"""Shared test helpers: constants and child-process targets.

Everything here is importable by name from a child started with the ``spawn`` or
``forkserver`` method (``tests/`` is on ``sys.path``, which ``multiprocessing`` hands to its
children), so child targets must live here, at module level, never inside a test.

Child targets take the connections under test as arguments and report back through one of
them; they never block without a way out: every wait in a child has a timeout
(``CHILD_TIMEOUT``) so that a bug ends the child instead of leaving it hanging.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

#: Tolerance for "waited at least T seconds" checks: clocks and timers on a busy
#: machine may fire this much early (CPython's test suite uses the same idea, CLOCK_RES).
CLOCK_RES = 0.05

#: Longest a child or the test waits for one step of a scenario before giving up.
CHILD_TIMEOUT = 30.0

#: Size of the "big message" scenarios of the default suite.
BIG_SIZE = 64 * 1024 * 1024


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes of a position-dependent pattern (detects shifted or mixed data)."""
    block = bytes((i * 7 + seed) & 0xFF for i in range(251))  # prime length: no alignment luck
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait_readable(conn: Any, what: str) -> None:
    if not conn.poll(CHILD_TIMEOUT):
        raise RuntimeError(f"child: timed out waiting for {what}")


def _recv(conn: Any, what: str = "a message") -> Any:
    _wait_readable(conn, what)
    return conn.recv()


# -- child targets ------------------------------------------------------------------------


def child_echo_and_report(duplex_conn: Any, reader: Any, writer: Any) -> None:
    """Exercise every call on connections received as Process arguments, then report.

    Reports on ``duplex_conn`` a dict of observations; echoes what the parent sends.
    """
    report: dict[str, Any] = {
        "pid": os.getpid(),
        "types": [type(c).__module__ + "." + type(c).__qualname__ for c in (duplex_conn, reader, writer)],
        "flags": [(c.readable, c.writable, c.closed) for c in (duplex_conn, reader, writer)],
    }
    # objects, then bytes, then recv_bytes_into, each echoed back
    obj = _recv(duplex_conn, "an object")
    duplex_conn.send(obj)
    _wait_readable(duplex_conn, "bytes")
    data = duplex_conn.recv_bytes()
    duplex_conn.send_bytes(data)
    buf = bytearray(len(data) + 3)
    _wait_readable(duplex_conn, "bytes for recv_bytes_into")
    report["into_size"] = duplex_conn.recv_bytes_into(buf, 3)
    report["into_ok"] = bytes(buf[3:]) == data
    # the one-way pair: read from the parent's writer, answer on the child's writer
    _wait_readable(reader, "a message on the one-way pipe")
    writer.send(("one-way", reader.recv()))
    try:
        reader.send("wrong direction")
    except OSError as exc:
        report["reader_send_error"] = str(exc)
    try:
        writer.recv()
    except OSError as exc:
        report["writer_recv_error"] = str(exc)
    duplex_conn.send(report)
    # stay until the parent says goodbye, so that the parent decides when EOF happens
    _recv(duplex_conn, "goodbye")


def child_send_then_exit(conn: Any, count: int) -> None:
    """Send ``count`` numbered objects and exit (the parent then sees EOFError)."""
    for i in range(count):
        conn.send(("item", i))


def child_close_and_exit(conn: Any) -> None:
    """Close the end at once and exit (the parent then sees a broken pipe)."""
    conn.close()


def child_big_echo(conn: Any, size: int) -> None:
    """Receive one big byte message, check it, and answer with another big one."""
    _wait_readable(conn, "a big message")
    data = conn.recv_bytes()
    ok = len(data) == size and data == pattern(size)
    conn.send(ok)
    conn.send_bytes(pattern(size, seed=1))


def child_receive_connection(transport_conn: Any, via: str) -> None:
    """Get a connection through another connection or a Queue, then use it."""
    if via == "queue":
        received = transport_conn.get(timeout=CHILD_TIMEOUT)
    else:
        received = _recv(transport_conn, "a connection")
    msg = _recv(received, "a message on the received connection")
    received.send(("child got", msg, type(received).__module__ + "." + type(received).__qualname__))
    _recv(received, "goodbye")
    received.close()


def child_handles(conn: Any) -> None:
    """recv_handle a file descriptor, read it, and send_handle one back."""
    from multiprocessing import reduction

    _wait_readable(conn, "a handle")
    fd = reduction.recv_handle(conn)
    with os.fdopen(fd, "rb") as f:
        content = f.read()
    conn.send(content)
    parent_pid = _recv(conn, "the parent's pid")
    left, right = socket.socketpair()
    with left, right:
        reduction.send_handle(conn, right.fileno(), parent_pid)
        # the parent writes through the descriptor it got; we read it here
        left.settimeout(CHILD_TIMEOUT)
        conn.send(left.recv(100))
    _recv(conn, "goodbye")


def child_sleep_then_send(conn: Any, delay: float, payload: Any) -> None:
    time.sleep(delay)
    conn.send(payload)
    _recv(conn, "goodbye")


def child_exit_after(delay: float) -> None:
    time.sleep(delay)


def child_pingpong(conn: Any, rounds: int) -> None:
    for _ in range(rounds):
        conn.send(_recv(conn) + 1)


def explode(message: str) -> None:
    """Used as a pickle reconstructor that fails in the receiver."""
    raise ValueError(message)


class FailsToUnpickle:
    """Pickles fine; unpickling raises ValueError("boom")."""

    def __reduce__(self) -> Any:
        return (explode, ("boom",))


class UnpicklableError(Exception):
    pass


class FailsToPickle:
    """Raises UnpicklableError while being pickled (after some of it was written)."""

    def __init__(self) -> None:
        self.filler = b"x" * 100_000

    def __reduce__(self) -> Any:
        raise UnpicklableError("cannot pickle this on purpose")


def python_executable() -> str:
    return sys.executable


# -- what a process sends just before it exits (tests/conformance/test_conformance_exit.py) --


def child_sends_from_a_thread_then_returns(conn: Any, count: int) -> None:
    """Return from run() while a non-daemon thread is still sending ``count`` objects."""
    import threading

    def send_later() -> None:
        time.sleep(0.2)  # run() has returned by now: the exit path is under way
        for i in range(count):
            conn.send(("item", i))

    threading.Thread(target=send_later).start()


def child_puts_on_a_queue_then_returns(queue: Any, count: int) -> None:
    """Put ``count`` objects on a multiprocessing.Queue and return (its feeder flushes them)."""
    for i in range(count):
        queue.put(("item", i))
