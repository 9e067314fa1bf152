"""Drop-in promises around the socket stream, run against the stdlib and every transport.

- ``socket.setdefaulttimeout()`` does not make a Pipe or Listener/Client connection time
  out (CPython's ``TestTimeouts.test_timeout``);
- a sender killed inside a message: every whole message arrives, then an error that is an
  ``EOFError`` (hyperpipe's promise) and, where the stdlib raises
  ``OSError("got end of file during message")``, also that ``OSError``;
- ``close()`` from another thread during a big send: the frame in progress is finished
  first (within ``CLOSE_SEND_BOUND`` on the socket transport), never cut in half.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time

import pytest

import hyperpipe
from hyperpipe._socket_transport import CLOSE_SEND_BOUND

CLOSE_REASON = "the stdlib cannot wake or bound a send when another thread closes"
BIG = 16 << 20  # far more than any socket buffer: the send blocks inside the frame


def _big(seed: int) -> bytes:
    return bytes([seed]) * BIG


def test_socket_default_timeout_does_not_apply(impl, run_in_thread):
    """CPython's TestTimeouts.test_timeout: with a 0.1 s default socket timeout, a receive
    that waits longer still gets its message, on a Pipe and on a Listener/Client pair."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.1)
    try:
        parent, child = impl.Pipe(duplex=True)
        listener = impl.module.Listener(family="AF_INET")
        address = listener.address

        def peer():
            time.sleep(0.5)
            child.send(123)
            child.close()
            with impl.module.Client(address) as conn:
                conn.send(456)

        thread = run_in_thread(peer)
        assert parent.recv() == 123
        parent.close()
        with listener.accept() as conn:
            assert conn.recv() == 456
        listener.close()
        thread.join(30)
        assert not thread.errors
    finally:
        socket.setdefaulttimeout(old)


def _send_then_die(conn, big_seed):
    conn.send_bytes(b"first")
    conn.send(("second", 2))
    conn.send_bytes(_big(big_seed))  # blocks inside the frame until killed
    time.sleep(60)


def test_sender_killed_mid_message(impl, procs):
    reader, writer = impl.Pipe(duplex=True)
    proc = procs.start(multiprocessing.get_context("fork"), _send_then_die, writer, 7)
    writer.close()
    assert reader.recv_bytes() == b"first"
    assert reader.recv() == ("second", 2)
    # Wait for the start of the big frame, then a little more for the sender to block.
    assert reader.poll(30) or impl.transport == "shm"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    with pytest.raises((EOFError, OSError)) as caught:
        while True:
            # Whatever arrives before the error is a whole message.
            assert reader.recv_bytes() == _big(7)
    error = caught.value
    if impl.is_stdlib:
        assert isinstance(error, OSError) and "end of file during message" in str(error)
    elif impl.transport == "socket":
        # Both what the stdlib raises and what hyperpipe promises.
        assert isinstance(error, hyperpipe.TruncatedMessageError)
        assert isinstance(error, EOFError) and isinstance(error, OSError)
        assert "end of file during message" in str(error)
    else:
        assert isinstance(error, EOFError)
    reader.close()


@pytest.mark.deliberate_difference(CLOSE_REASON)
def test_close_during_a_big_send_finishes_the_frame(impl, run_in_thread):
    """The reader starts late; close() waits for the frame, which arrives whole, then EOF."""
    a, b = impl.Pipe()
    received = []

    def read_late():
        time.sleep(0.3)
        received.append(b.recv_bytes())
        try:
            b.recv_bytes()
        except EOFError as exc:
            received.append(exc)

    sender = run_in_thread(a.send_bytes, _big(3))
    time.sleep(0.2)  # the sender is blocked inside its frame
    reader = run_in_thread(read_late)
    a.close()
    sender.join(30)
    reader.join(30)
    assert not sender.errors, "the frame in progress was not finished"
    assert not reader.errors
    assert received[0] == _big(3)
    assert isinstance(received[1], EOFError)
    b.close()


@pytest.mark.deliberate_difference(CLOSE_REASON)
@pytest.mark.parametrize("timeout", [None, 60.0], ids=["blocking-write", "polled-write"])
def test_close_during_a_big_send_is_bounded(impl, run_in_thread, timeout):
    """Nobody reads: close() gives up on the frame after the bound; the reader then gets
    the whole messages before it and an EOFError, never a half message as data."""
    a, b = impl.Pipe()
    a.send_bytes(b"whole")
    sender = run_in_thread(lambda: a.send_bytes(_big(4), timeout=timeout))
    time.sleep(0.2)
    start = time.monotonic()
    a.close()
    took = time.monotonic() - start
    sender.join(30)
    if impl.transport == "socket":
        assert CLOSE_SEND_BOUND - 0.5 < took < CLOSE_SEND_BOUND + 2
        assert len(sender.errors) == 1
        assert isinstance(sender.errors[0], hyperpipe.ConnectionClosedError)
    assert b.recv_bytes(timeout=10) == b"whole"
    with pytest.raises(EOFError):
        # shm: the frame went whole into the segment before close, or not at all
        while True:
            assert b.recv_bytes(timeout=10) == _big(4)
    b.close()
