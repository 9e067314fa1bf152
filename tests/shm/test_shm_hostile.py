"""A peer that scribbles on the shared segment: we get a ProtocolError, never a crash.

Each test runs in a child process (so that a crash, the old behaviour, fails the test
instead of killing the run) that plays the hostile peer itself: it maps the pipe's memfd
(``ep.fds()``) and writes impossible indices or frames into it, or hands over descriptors
that do not match their frame, then checks what the victim end raises. The threat model
is in docs/design.md ("Threat model").
"""

from __future__ import annotations

import errno
import functools
import multiprocessing
import mmap
import os
import resource
import select
import socket
import struct
import time
from typing import Any, Callable

import pytest

import hyperpipe
from hyperpipe import _core
from hyperpipe._shm_transport import _MEMFD, KIND_DATA, KIND_OOB, _oob_head

CAPACITY = 4096
HEADER = struct.Struct("<QIIIIQQQQQ")  # hp_seg_header (csrc/hp_ring.h)
CTRL_OFFSET = 64
HEAD, TAIL = 0, 64  # offsets in an hp_ring_ctrl
OOB_MSGS_SENT, OOB_MSGS_RECV = 16, 80
U64 = struct.Struct("<Q")


def _endpoint(conn: Any) -> Any:
    return conn._transport._ep


class Segment:
    """The pipe's segment as a hostile peer sees it: every byte writable."""

    def __init__(self, conn: Any) -> None:
        memfd = _endpoint(conn).fds()[0]
        self.memfd = memfd
        self.map = mmap.mmap(memfd, os.fstat(memfd).st_size)
        (_, _, _, _, self.ctrl_size, self.capacity, self.data_offset, _, self.heap_size,
         self.heap_offset) = HEADER.unpack_from(self.map)  # fmt: skip

    def field(self, ring: int, offset: int, value: int | None = None) -> int:
        at = CTRL_OFFSET + ring * self.ctrl_size + offset
        if value is not None:
            U64.pack_into(self.map, at, value % (1 << 64))
        return U64.unpack_from(self.map, at)[0]

    def put_frame(self, ring: int, pos: int, length: int, kind: int = KIND_DATA, nfds: int = 0,
                  payload: bytes = b"") -> None:  # fmt: skip
        at = self.data_offset + ring * self.capacity + pos
        self.map[at : at + 8] = struct.pack("<IBBH", length, kind, nfds, 0)
        self.map[at + 8 : at + 8 + len(payload)] = payload

    def publish(self, ring: int, length: int, kind: int = KIND_DATA, nfds: int = 0, payload: bytes = b"") -> None:
        """A well-formed frame at the current head (no wrap needed), published."""
        head = self.field(ring, HEAD)
        self.put_frame(ring, head % self.capacity, length, kind, nfds, payload)
        self.field(ring, HEAD, head + 8 + (length + 7) // 8 * 8)


def victim(test: Callable[..., None]) -> Callable[..., None]:
    """Run the test's body in a child process, which plays both the victim and the hostile
    peer: a crash (the old behaviour) or a hang then fails the test, not the run.

    The child comes from a forkserver: a fork of the test process itself (which has
    threads) could deadlock in its allocator under AddressSanitizer."""

    @functools.wraps(test)
    def run(**params: Any) -> None:
        proc = multiprocessing.get_context("forkserver").Process(target=_run_body, args=(test.__name__, params))
        proc.start()
        try:
            proc.join(30)
            assert not proc.is_alive(), "the victim hung for more than 30 s"
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        code = proc.exitcode
        assert code is not None and code >= 0, f"the victim was killed by signal {-(code or 0)}"
        assert code == 0, "the test failed in the child (its traceback is above)"
        proc.close()

    run.body = test  # type: ignore[attr-defined]
    return run


def _run_body(name: str, params: dict) -> None:
    globals()[name].body(**params)


def assert_unusable(receive: Callable[[], Any], match: str | None = None) -> None:
    """The first call and every later one fail at once with a ProtocolError."""
    for _ in range(2):
        start = time.monotonic()
        with pytest.raises(hyperpipe.ProtocolError, match=match):
            receive()
        assert time.monotonic() - start < 5


# -- a hostile producer: the reader must stay inside its ring -------------------------


@victim
def test_frame_running_past_the_end_of_the_ring() -> None:
    # Simplex: the reader's ring is the last thing of the mapping, so reading past it
    # read another mapping's bytes (or faulted).
    reader, writer = hyperpipe.Pipe(False, transport="shm", ring_size=CAPACITY)
    seg = Segment(reader)
    pos = CAPACITY - 8  # the consumer's tail: a frame here needs a wrap marker
    seg.field(0, TAIL, pos)
    seg.put_frame(0, pos, 2000)
    seg.field(0, HEAD, pos + 2008)  # as many bytes published as the frame claims
    assert_unusable(reader.recv_bytes, "incoming ring")
    assert reader.poll(0)  # readable, so that a waiting caller finds the error


@pytest.mark.parametrize(
    "head, tail",
    [
        (CAPACITY * 3, CAPACITY),  # more published than the ring holds
        (100, 200),  # the producer behind the consumer
        (CAPACITY + 13, CAPACITY + 5),  # not frame-aligned
        (CAPACITY * 2 + 16, CAPACITY * 2 - 4),  # the consumer's own index unaligned
    ],
)
@victim
def test_impossible_indices_seen_by_the_reader(head: int, tail: int) -> None:
    reader, writer = hyperpipe.Pipe(False, transport="shm", ring_size=CAPACITY)
    seg = Segment(reader)
    seg.field(0, TAIL, tail)
    seg.field(0, HEAD, head)
    assert_unusable(reader.recv_bytes)
    assert_unusable(lambda: reader.recv_bytes(), "unusable")  # sticky, also with data now


@victim
def test_a_reader_waiting_when_the_index_goes_bad_is_told_at_once() -> None:
    reader, writer = hyperpipe.Pipe(False, transport="shm", ring_size=CAPACITY)
    seg = Segment(reader)
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(0.2)  # the parent is asleep in recv by now
            seg.field(0, HEAD, 12345)
            os.eventfd_write(_endpoint(reader).fds()[2], 1)  # the wake-up a publish gives
        finally:
            os._exit(0)
    start = time.monotonic()
    with pytest.raises(hyperpipe.ProtocolError):
        reader.recv_bytes()
    assert time.monotonic() - start < 5
    os.waitpid(pid, 0)


@victim
def test_frame_fields_out_of_range() -> None:
    reader, writer = hyperpipe.Pipe(False, transport="shm", ring_size=CAPACITY)
    seg = Segment(reader)
    seg.publish(0, 16, kind=KIND_DATA, nfds=200, payload=b"x" * 16)  # more fds than a frame has
    assert_unusable(reader.recv_bytes, "descriptors")
    reader2, writer2 = hyperpipe.Pipe(False, transport="shm", ring_size=CAPACITY)
    seg2 = Segment(reader2)
    seg2.publish(0, 0, kind=KIND_OOB)  # an out-of-band frame without its table
    assert_unusable(reader2.recv_bytes, "too short")
    reader3, writer3 = hyperpipe.Pipe(False, transport="shm", ring_size=CAPACITY)
    seg3 = Segment(reader3)
    seg3.field(0, HEAD, 8)
    seg3.put_frame(0, 0, 0x7FFFFFFF)  # a length beyond what was published
    assert_unusable(reader3.recv_bytes, "incoming ring")


@pytest.mark.parametrize(
    "offset, size",
    [
        (1 << 40, 16),  # outside the heap
        (_core.HEAP_BLOCK_HEADER + (1 << 16) * 3, 16),  # a granule's block never allocated (no reference)
        (_core.HEAP_BLOCK_HEADER, 1 << 20),  # a live block, but more bytes than it has
    ],
)
@victim
def test_heap_frames_must_name_a_live_block(offset: int, size: int) -> None:
    reader, writer = hyperpipe.Pipe(False, transport="shm", ring_size=CAPACITY)
    writer.send_bytes(b"b" * 100_000)  # a real block at the heap's start, of two granules
    assert reader.recv_bytes() == b"b" * 100_000
    seg = Segment(reader)
    head, _ = _oob_head(size, offset, [(0, size)], 0)
    if offset == _core.HEAP_BLOCK_HEADER:
        writer.send_bytes(b"c" * 100_000)  # and keep it alive: its frame holds a reference
        seg.field(0, HEAD, seg.field(0, HEAD) - ((8 + len(head) + 7) & ~7))  # replace that frame by ours
    seg.publish(0, len(head), kind=KIND_OOB, payload=head)
    assert_unusable(reader.recv_bytes, "heap")


# -- a hostile consumer: the writer must stay inside its ring ---------------------------


@pytest.mark.parametrize(
    "head, tail",
    [
        (CAPACITY - 3, CAPACITY - 3),  # unaligned: the wrap marker went 5 bytes past the mapping
        (CAPACITY * 5, CAPACITY),  # more in flight than the ring holds
        (0, 8),  # the consumer ahead of the producer
    ],
)
@victim
def test_impossible_indices_seen_by_the_writer(head: int, tail: int) -> None:
    reader, writer = hyperpipe.Pipe(False, transport="shm", ring_size=CAPACITY)
    seg = Segment(writer)
    seg.field(0, HEAD, head)
    seg.field(0, TAIL, tail)
    for _ in range(2):
        with pytest.raises(hyperpipe.ProtocolError, match="outgoing ring"):
            writer.send_bytes(b"w" * 100)


@victim
def test_consumer_claiming_more_out_of_band_messages_than_sent() -> None:
    reader, writer = hyperpipe.Pipe(False, transport="shm", ring_size=CAPACITY, heap_size=0)
    seg = Segment(writer)
    seg.field(0, OOB_MSGS_RECV, 5)
    with pytest.raises(hyperpipe.ProtocolError, match="outgoing ring"):
        writer.send_bytes(b"m" * 100_000)  # out of band, through a memfd


# -- the memfds: sealed, so that nobody can truncate them under a mapping -----------------


@victim
def test_segment_cannot_be_truncated() -> None:
    a, b = hyperpipe.Pipe(transport="shm", ring_size=CAPACITY)
    memfd = _endpoint(a).fds()[0]
    with pytest.raises(PermissionError):
        os.ftruncate(memfd, 0)  # before, the next access to the ring was a SIGBUS
    with pytest.raises(PermissionError):
        os.ftruncate(memfd, os.fstat(memfd).st_size * 2)
    a.send_bytes(b"still fine")
    assert b.recv_bytes() == b"still fine"


def test_an_unsealed_segment_is_refused_on_attach() -> None:
    good = _core.segment_create(CAPACITY, 1)
    try:
        size = os.fstat(good).st_size
        bogus = os.memfd_create("hyperpipe-unsealed")
        os.write(bogus, os.pread(good, size, 0))  # a valid header, but the peer could truncate it
    finally:
        os.close(good)
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(hyperpipe.ProtocolError, match="sealed"):
        _core.Endpoint(bogus, s1.detach(), os.eventfd(0), -1, 0, -1)  # takes and closes the fds
    s2.close()


@pytest.mark.parametrize("sealed", [False, True])
@victim
def test_out_of_band_memfd_must_be_sealed_and_large_enough(sealed: bool) -> None:
    reader, writer = hyperpipe.Pipe(False, transport="shm", ring_size=CAPACITY, heap_size=0)
    if sealed:  # sealed, but smaller than the frame says
        fd = _core.buffer_memfd(4096)
    else:  # the right size, but the sender could truncate it after we mapped it
        fd = os.memfd_create("hyperpipe-unsealed")
        os.ftruncate(fd, 1 << 20)
    sock = socket.socket(fileno=os.dup(_endpoint(writer).fds()[1]))
    socket.send_fds(sock, [b"F"], [fd])
    sock.close()
    os.close(fd)
    seg = Segment(writer)
    head, _ = _oob_head(1 << 20, _MEMFD, [(0, 1 << 20)], 0)
    seg.publish(0, len(head), kind=KIND_OOB, nfds=1, payload=head)
    with pytest.raises(hyperpipe.ProtocolError, match="refused"):
        reader.recv_bytes()


def test_buffer_memfds_are_sealed_but_writable() -> None:
    fd = _core.buffer_memfd(1 << 16)
    try:
        _core.check_memfd(fd, 1 << 16)  # raises if not
        with pytest.raises(hyperpipe.ProtocolError, match="smaller"):
            _core.check_memfd(fd, (1 << 16) + 1)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with mmap.mmap(fd, 1 << 16) as m:
            m[:5] = b"hello"  # no write seal: a SharedBuffer's pages stay writable
            assert m[:5] == b"hello"
    finally:
        os.close(fd)


# -- resource exhaustion says what ran out (issue 12 item 6) ----------------------------


def _lowest_free_fd() -> int:
    fd = os.dup(0)
    os.close(fd)
    return fd


@victim
def test_no_descriptor_for_an_out_of_band_buffer() -> None:
    reader, writer = hyperpipe.Pipe(False, transport="shm", heap_size=0)
    big = b"z" * 200_000
    writer.send_bytes(big)  # its memfd waits in the socket
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))
    try:
        with pytest.raises(OSError, match="descriptor") as info:
            reader.recv_bytes()
        assert info.value.errno == errno.EMFILE
        assert not isinstance(info.value, hyperpipe.ProtocolError)
        with pytest.raises(OSError, match="shared memory") as info:
            writer.send_bytes(big)  # cannot make its memfd either
        assert info.value.errno == errno.EMFILE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert reader.recv_bytes() == big  # the message waited for a free descriptor
    assert not reader.poll(0.05)  # the failed send sent nothing
    writer.send_bytes(big)  # and the connection goes on
    assert reader.recv_bytes() == big
