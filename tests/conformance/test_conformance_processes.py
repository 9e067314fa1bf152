"""Connections across processes, for every implementation under fork, spawn and forkserver.

Each test starts as few children as it can and checks several things per child (process
start costs ~0.1-0.3 s under spawn/forkserver). Every wait in the parent has a timeout, and
the ``procs`` fixture joins children with a timeout and kills leftovers.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time
from multiprocessing import reduction

import pytest

import helpers
from helpers import CHILD_TIMEOUT

pytestmark = pytest.mark.usefixtures("ctx")


def recv_within(conn, timeout=CHILD_TIMEOUT, what="a message"):
    assert conn.poll(timeout), f"nothing arrived within {timeout} s while waiting for {what}"
    return conn.recv()


def qualified_name(obj):
    return type(obj).__module__ + "." + type(obj).__qualname__


def expect_eof(conn, timeout=CHILD_TIMEOUT):
    """The peer is gone: poll turns true within ``timeout`` and recv raises EOFError."""
    assert conn.poll(timeout), "EOF was not reported by poll"
    with pytest.raises(EOFError):
        conn.recv()


def test_connections_as_process_arguments(impl, ctx, procs, pipe):
    parent_duplex, child_duplex = pipe()
    child_reader, parent_writer = pipe(duplex=False)
    parent_reader, child_writer = pipe(duplex=False)
    proc = procs.start(ctx, helpers.child_echo_and_report, child_duplex, child_reader, child_writer)
    # as users do: drop the parent's copies of the child's ends
    for conn in (child_duplex, child_reader, child_writer):
        conn.close()
    obj = {"nested": [1, 2.5, "three", (None, b"four")]}
    parent_duplex.send(obj)
    assert recv_within(parent_duplex, what="the echoed object") == obj
    data = helpers.pattern(100_000)
    parent_duplex.send_bytes(data)
    assert parent_duplex.poll(CHILD_TIMEOUT)
    assert parent_duplex.recv_bytes() == data
    parent_duplex.send_bytes(data)
    parent_writer.send("over the one-way pipe")
    assert recv_within(parent_reader) == ("one-way", "over the one-way pipe")
    report = recv_within(parent_duplex, what="the child's report")
    assert report["pid"] == proc.pid != os.getpid()
    # the child got the same class as the parent holds
    assert report["types"] == [qualified_name(parent_duplex)] * 3
    assert report["flags"] == [(True, True, False), (True, False, False), (False, True, False)]
    assert report["into_size"] == len(data) and report["into_ok"]
    assert report["reader_send_error"] == "connection is read-only"
    assert report["writer_recv_error"] == "connection is write-only"
    parent_duplex.send("goodbye")
    proc.join(CHILD_TIMEOUT)
    assert proc.exitcode == 0
    # the child exited: every connection to it now reports EOF
    expect_eof(parent_duplex)
    expect_eof(parent_reader)
    with pytest.raises(BrokenPipeError):
        parent_writer.send("nobody reads this")
    for conn in (parent_duplex, parent_reader, parent_writer):
        conn.close()


def test_eof_after_child_sent_and_exited(impl, ctx, procs, pipe):
    a, b = pipe()
    proc = procs.start(ctx, helpers.child_send_then_exit, b, 50)
    b.close()
    proc.join(CHILD_TIMEOUT)
    assert proc.exitcode == 0
    # everything the child sent before exiting is still readable, then EOF
    assert [recv_within(a) for _ in range(50)] == [("item", i) for i in range(50)]
    expect_eof(a)
    a.close()


def test_broken_pipe_after_child_closed_and_exited(impl, ctx, procs, pipe):
    a, b = pipe()
    reader, writer = pipe(duplex=False)
    proc = procs.start(ctx, helpers.child_close_and_exit, b)
    proc2 = procs.start(ctx, helpers.child_close_and_exit, reader)
    b.close()
    reader.close()
    proc.join(CHILD_TIMEOUT)
    proc2.join(CHILD_TIMEOUT)
    assert (proc.exitcode, proc2.exitcode) == (0, 0)
    with pytest.raises(BrokenPipeError):
        a.send("x")
    with pytest.raises(BrokenPipeError):
        writer.send_bytes(b"x")
    a.close()
    writer.close()


def test_eof_when_child_is_killed_while_parent_waits_in_recv(impl, ctx, procs, pipe):
    a, b = pipe()
    proc = procs.start(ctx, helpers.child_sleep_then_send, b, 600.0, "never sent")
    b.close()
    killer = threading.Timer(0.3, os.kill, (proc.pid, signal.SIGKILL))
    killer.start()
    try:
        # blocking recv with no timeout: the peer's death must end it
        with pytest.raises(EOFError):
            a.recv()
    finally:
        killer.cancel()
    proc.join(CHILD_TIMEOUT)
    assert proc.exitcode == -signal.SIGKILL
    a.close()


def test_big_messages_both_ways(impl, ctx, procs, pipe):
    a, b = pipe()
    proc = procs.start(ctx, helpers.child_big_echo, b, helpers.BIG_SIZE)
    b.close()
    a.send_bytes(helpers.pattern(helpers.BIG_SIZE))
    assert recv_within(a, what="the child's check") is True
    assert a.poll(CHILD_TIMEOUT)
    got = a.recv_bytes()
    assert len(got) == helpers.BIG_SIZE
    assert got == helpers.pattern(helpers.BIG_SIZE, seed=1)
    proc.join(CHILD_TIMEOUT)
    assert proc.exitcode == 0
    a.close()


@pytest.mark.parametrize("via", ["connection", "queue"])
def test_connection_sent_to_a_running_child(impl, ctx, procs, pipe, via):
    a, b = pipe()
    carrier = ctx.Queue() if via == "queue" else None
    try:
        if carrier is not None:
            proc = procs.start(ctx, helpers.child_receive_connection, carrier, "queue")
            carrier.put(b)
        else:
            carrier_parent, carrier_child = pipe()
            proc = procs.start(ctx, helpers.child_receive_connection, carrier_child, "connection")
            carrier_child.close()
            carrier_parent.send(b)
        a.send("hello")
        answer = recv_within(a, what="the answer on the received connection")
        assert answer == ("child got", "hello", qualified_name(a))
        a.send("goodbye")
        proc.join(CHILD_TIMEOUT)
        assert proc.exitcode == 0
        b.close()
        expect_eof(a)
    finally:
        if carrier is not None:
            carrier.close()
            carrier.join_thread()


def test_send_handle_and_recv_handle(impl, ctx, procs, pipe):
    if impl.transport == "shm":
        # Deliberate difference (README): the shared-memory transport's fileno() is an epoll
        # descriptor, readable exactly when a message is waiting, not a socket, so
        # reduction.send_handle/recv_handle need Pipe(transport="socket").
        pytest.skip("send_handle/recv_handle need the socket transport (documented difference)")
    a, b = pipe()
    proc = procs.start(ctx, helpers.child_handles, b)
    b.close()
    with tempfile.TemporaryFile() as f:
        f.write(b"content of a file passed by descriptor")
        f.flush()
        f.seek(0)
        reduction.send_handle(a, f.fileno(), proc.pid)
        assert recv_within(a) == b"content of a file passed by descriptor"
    a.send(os.getpid())
    assert a.poll(CHILD_TIMEOUT)
    fd = reduction.recv_handle(a)
    with socket.socket(fileno=fd) as sock:
        sock.sendall(b"written through the passed socket")
    assert recv_within(a) == b"written through the passed socket"
    a.send("goodbye")
    proc.join(CHILD_TIMEOUT)
    assert proc.exitcode == 0
    a.close()


def test_wait_over_connections_sockets_and_sentinels(impl, ctx, procs, pipe):
    a, b = pipe()
    reader, writer = pipe(duplex=False)
    s1, s2 = socket.socketpair()
    proc = procs.start(ctx, helpers.child_exit_after, 0.3)
    objects = [a, reader, s1, proc.sentinel]
    try:
        assert impl.wait(objects, 0) == []
        s2.send(b"x")
        assert impl.wait(objects, CHILD_TIMEOUT) == [s1]
        s1.recv(1)
        # the child exits after 0.3 s: its sentinel becomes ready
        assert impl.wait(objects, CHILD_TIMEOUT) == [proc.sentinel]
        proc.join(CHILD_TIMEOUT)
        writer.send(1)
        b.send(2)
        deadline = time.monotonic() + CHILD_TIMEOUT
        ready = []
        while set(ready) != {a, reader, proc.sentinel} and time.monotonic() < deadline:
            ready = impl.wait(objects, CHILD_TIMEOUT)
        assert set(ready) == {a, reader, proc.sentinel}
        assert (a.recv(), reader.recv()) == (2, 1)
        assert impl.wait(objects, 0) == [proc.sentinel]
    finally:
        for obj in (a, b, reader, writer, s1, s2):
            obj.close()


def test_pingpong_many_round_trips(impl, ctx, procs, pipe):
    a, b = pipe()
    proc = procs.start(ctx, helpers.child_pingpong, b, 2000)
    b.close()
    value = 0
    for _ in range(2000):
        a.send(value)
        value = recv_within(a)
    assert value == 2000
    proc.join(CHILD_TIMEOUT)
    assert proc.exitcode == 0
    expect_eof(a)
    a.close()
