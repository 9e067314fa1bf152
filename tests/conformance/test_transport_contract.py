"""The Transport base class: a transport that implements only the primitives gets every
Connection method through the defaults, and says so in its capabilities."""

from __future__ import annotations

import collections
import os
import select
import threading
import time

import pytest

import hyperpipe
from hyperpipe import errors
from hyperpipe._transport import PASSED, Capabilities, Transport


class _Shared:
    """Two queues of frames and a wake-up descriptor per direction, in one process."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.queues = (collections.deque(), collections.deque())
        self.efds = (os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK))
        self.closed = [False, False]


class MinimalTransport(Transport):
    """Implements only what the base class requires."""

    name = "minimal"

    def __init__(self, shared: _Shared, side: int) -> None:
        self.shared, self.rx, self.tx = shared, side, 1 - side

    def send_frame(self, data, deadline):
        with self.shared.cond:
            if self.shared.closed[self.tx]:
                raise errors.BrokenPipeError()
            self.shared.queues[self.tx].append(bytes(data))
            os.eventfd_write(self.shared.efds[self.tx], 1)
            self.shared.cond.notify_all()

    def _wait(self, deadline):
        with self.shared.cond:
            while not self.shared.queues[self.rx] and not self.shared.closed[self.tx]:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self.shared.cond.wait(remaining)
            return True

    def recv_frame(self, maxlength, deadline):
        if not self._wait(deadline):
            raise errors.TimeoutError()
        with self.shared.cond:
            queue = self.shared.queues[self.rx]
            if not queue:
                raise errors.PeerClosedError()
            if maxlength is not None and len(queue[0]) > maxlength:
                raise errors.MessageTooLongError()
            if len(queue) == 1:
                os.eventfd_read(self.shared.efds[self.rx])
            return queue.popleft()

    def poll(self, deadline):
        return self._wait(deadline)

    def fileno(self):
        return self.shared.efds[self.rx]

    def close(self):
        with self.shared.cond:
            self.shared.closed[self.rx] = True
            self.shared.cond.notify_all()
            if all(self.shared.closed):
                for fd in self.shared.efds:
                    os.close(fd)

    def reduce(self):
        raise TypeError("a MinimalTransport stays in its process")


@pytest.fixture
def ends():
    shared = _Shared()
    a = hyperpipe.Connection(MinimalTransport(shared, 0))
    b = hyperpipe.Connection(MinimalTransport(shared, 1))
    yield a, b
    a.close()
    b.close()


def test_every_connection_method_works_through_the_defaults(ends):
    a, b = ends
    a.send({"x": 1})
    assert b.poll(PASSED) and b.recv() == {"x": 1}
    a.send_bytes_many([b"1", b"22", b"333"])
    assert b.recv_bytes_many(2) == [b"1", b"22"]
    buf = bytearray(8)
    assert b.recv_bytes_into(buf, 2) == 3 and buf[2:5] == b"333"
    a.send_bytes(b"too long")
    with pytest.raises(hyperpipe.BufferTooShort):
        b.recv_bytes_into(bytearray(2))
    assert not b.poll(0.05)
    with pytest.raises(NotImplementedError):
        a.allocate_buffer(1 << 20)
    a.close()
    with pytest.raises(EOFError):
        b.recv()


def test_event_loop_facts_default_to_the_plain_descriptor(ends):
    a, b = ends
    assert a.capabilities == Capabilities()
    assert a.catch_incoming(0.01) is False
    assert a.send_backlog() == 0
    assert a.arm_writable() is False
    assert a.writable_fileno() == (a.fileno(), select.POLLOUT)


class NoDescriptorTransport(MinimalTransport):
    capabilities = Capabilities(readable_fd=False)

    def fileno(self):
        raise AssertionError("an event loop must not wait on the descriptor of this transport")


def test_asyncio_waits_without_a_readable_descriptor():
    import asyncio

    from hyperpipe.asyncio import AsyncConnection

    shared = _Shared()
    a = hyperpipe.Connection(MinimalTransport(shared, 0))
    b = AsyncConnection(hyperpipe.Connection(NoDescriptorTransport(shared, 1)))
    timer = threading.Timer(0.05, a.send, ("late",))
    timer.start()
    try:
        assert asyncio.run(asyncio.wait_for(b.recv(), 30)) == "late"
    finally:
        timer.join(10)
        a.close()
        b.close()
