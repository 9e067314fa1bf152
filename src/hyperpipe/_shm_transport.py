"""The shared-memory transport: C rings for small frames, memfd buffers for big ones.

One ``Pipe()`` = one anonymous memfd segment holding a ring per direction (see
``csrc/hp_ring.h``), one ``AF_UNIX``/``SOCK_SEQPACKET`` socketpair (out-of-band buffer
fds travel over it with ``SCM_RIGHTS``; its hang-up is how a peer's close or death is
seen) and one eventfd per direction (the reader's wake-up, also what ``fileno()``
reports through a small epoll set). docs/design.md describes the layout, the memory
orderings, the wakeup protocol and the out-of-band buffers.

Frames on a ring, two kinds:

- ``KIND_DATA`` the payload itself (``send_bytes`` or a pickle with no big buffer);
- ``KIND_OOB``  a message whose big buffers are out of band, in one block of the sender's
  heap (a region of the segment mapped once by both ends, see ``csrc/hp_heap.h``) or in a
  memfd passed over the socket just before the frame (heap full or disabled, and
  ``allocate_buffer``'s own memfds). Payload: ``_OOB_HEAD`` (block size, heap offset or
  ``_MEMFD``, buffer count) + one ``_OOB_SPAN`` (offset, size) per buffer + one for the
  pickle stream (offset ``_INLINE``: the stream follows in the frame). An empty stream is
  raw bytes (``send_bytes``): one buffer. ``FLAG_SHARED``: the sender keeps a writable
  mapping of the block (``allocate_buffer``). ``FLAG_NDARRAY``: the stream is not a pickle
  but ``_ARRAY``, a plain numpy array's order, shape and dtype (one buffer).
The first 8 bytes of a ``KIND_OOB`` frame hold its block size: the C core counts it
against the cap on bytes in flight.
"""

from __future__ import annotations

import errno
import functools
import importlib
import io
import mmap
import os
import pickle
import select
import socket
import struct
import sys
import weakref
from multiprocessing import reduction
from multiprocessing.reduction import ForkingPickler
from typing import Any, Optional

from . import errors
from ._pickling import dumps
from ._transport import Capabilities, Deadline, Transport

try:
    from . import _core
except ImportError:  # the optional C extension was not built
    _core = None  # type: ignore[assignment]

KIND_DATA = 1
KIND_OOB = 2
#: the sender keeps a writable mapping of the buffer (allocate_buffer): copy=True copies
FLAG_SHARED = 1
#: the stream is an ``_ARRAY`` description of a numpy array over the one buffer, not a pickle
FLAG_NDARRAY = 2

_INLINE = (1 << 64) - 1  # a stream offset: the stream follows the spans in the frame
_MEMFD = -1  # a block offset: the block is the memfd passed with the frame
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
_OOB_HEAD = struct.Struct("<QQqI")
_OOB_SPAN = struct.Struct("<QQ")
# FLAG_NDARRAY's stream: order ("C" or "F"), ndim, dtype string length, then the shape
# (ndim int64s) and the dtype string (numpy's dtype.str, e.g. "<f8").
_ARRAY = struct.Struct("<cBH")
_ARRAY_KINDS = "biufc"  # plain numbers: the dtype string says all there is to say

DEFAULT_OPTIONS: dict[str, int] = {
    # Bytes per direction, a power of two. 256 KiB streams small messages as fast as 1 MiB
    # did, 10% slower for 16-60 KiB ones, and makes Pipe() 3x cheaper (0.5 MiB of shared
    # memory instead of 2 MiB, ~190 µs instead of ~580 µs to create).
    "ring_size": 1 << 18,
    "heap_size": 1 << 30,  # shared heap per direction for big buffers (sparse), 0: none
    "oob_threshold": 64 << 10,  # frames/buffers at least this big go out of band
    "max_inflight_bytes": 64 << 20,  # out-of-band bytes sent but not yet received
    "max_inflight_fds": 64,  # out-of-band messages sent but not yet received
    "spin_us": 50,  # how long a waiting receiver/sender spins before sleeping
}

_HeapBlock = getattr(_core, "HeapBlock", None)

if _core is not None:
    _core._set_errors(
        errors.TimeoutError,
        errors.ConnectionClosedError,
        errors.PeerClosedError,
        errors.BrokenPipeError,
        errors.ProtocolError,
        errors.MessageTooLongError,
        errors.BufferTooShort,
    )

_available: Optional[bool] = None


#: errors of a probe that say nothing about the kernel: out of descriptors or memory for now
_PASSING_SHORTAGES = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def available() -> bool:
    """True when the C core is built and the kernel has what it needs (Linux, memfd)."""
    global _available
    if _available is None:
        ok = _core is not None and sys.platform.startswith("linux") and hasattr(os, "memfd_create")
        if ok:
            try:
                os.close(_core.segment_create(4096, 1))
            except OSError as exc:
                if exc.errno in _PASSING_SHORTAGES:
                    # not an answer: asked again next time, and Pipe() reports the shortage
                    return True
                ok = False
        _available = ok
    return _available


class SharedBuffer(mmap.mmap):
    """A writable buffer in shared memory (from ``allocate_buffer``).

    Sending it whole (``send_bytes(buf)``, or ``send`` of an object whose single big
    buffer is all of it, e.g. ``np.frombuffer(buf)``) passes its memfd: no copy. The
    receiver of ``recv(copy=True)`` still gets a private copy, since this process keeps
    a writable mapping; ``copy=False`` gives read-only views of the same pages.
    """

    _hp_fd: int

    @classmethod
    def _create(cls, nbytes: int) -> "SharedBuffer":
        fd = _new_memfd(nbytes)
        try:
            buf = cls(fd, nbytes, flags=_MAP_FLAGS)
        except BaseException:
            os.close(fd)
            raise
        buf._hp_fd = fd
        weakref.finalize(buf, os.close, fd)
        return buf


def _new_memfd(nbytes: int) -> int:
    """A memfd of ``nbytes`` whose pages are allocated now (ENOSPC here, never SIGBUS later),
    sealed against resizing but writable (a SharedBuffer's)."""
    return _core.buffer_memfd(nbytes)


_EMPTY = memoryview(b"")


def _oob_size(block: int, spans: list, stream_len: int) -> int:
    """A ``KIND_OOB`` message's size as ``recv_bytes(maxlength)`` and the in-flight cap see
    it: the raw bytes' length, or the block's for an object."""
    return block if stream_len else spans[0][1]


def _byte_view(data: Any) -> memoryview:
    return data if type(data) is memoryview else memoryview(data)


def _oob_head(
    block: int, base: int, spans: list, stream_len: int, stream_at: int = _INLINE
) -> tuple[bytes, int]:
    """The ``KIND_OOB`` frame's fixed part (``stream_at``: where the stream starts in the
    block) and the message's size, which the frame begins with."""
    size = _oob_size(block, spans, stream_len)
    parts = [_OOB_HEAD.pack(size, block, base, len(spans))]
    parts += [_OOB_SPAN.pack(at, n) for at, n in spans]
    parts.append(_OOB_SPAN.pack(stream_at, stream_len))
    return b"".join(parts), size


def _array_stream(arr: Any) -> Optional[bytes]:
    """The FLAG_NDARRAY description of a numpy array that pickle would send as
    ``_frombuffer(PickleBuffer, dtype, shape, order)``, when its dtype is a plain number
    type; else None (pickle it)."""
    dtype = arr.dtype
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None or dtype.metadata:
        return None
    flags = arr.flags
    order = b"C" if flags.c_contiguous else b"F" if flags.f_contiguous else None
    if order is None:
        return None
    code = dtype.str.encode()
    shape = arr.shape
    return _ARRAY.pack(order, len(shape), len(code)) + _array_dims(len(shape)).pack(*shape) + code


def _owned_c_array_stream(arr: Any) -> Optional[bytes]:
    """``_array_stream`` of an array in C order, remembered per dtype object and shape (a
    stream of arrays is usually of one shape and type)."""
    dtype = arr.dtype
    key = (id(dtype), arr.shape)
    known = _sent_descriptions.get(key)
    # The entry keeps its dtype alive, so no other dtype can have its id; `is`, not ==:
    # equal dtypes can differ in metadata, which only a pickle carries.
    if known is not None and known[0] is dtype:
        return known[1]
    stream = _array_stream(arr)
    if len(_sent_descriptions) < 64:
        _sent_descriptions[key] = (dtype, stream)
    return stream


# (id(dtype), shape) -> (dtype, FLAG_NDARRAY stream or None), of C-order arrays sent.
_sent_descriptions: dict = {}


def _array_from(stream: Any, buffers: list) -> Any:
    """The array a FLAG_NDARRAY message describes, over its one buffer: what pickle's
    ``_frombuffer`` would make (``frombuffer(buf, dtype).reshape(shape, order)``)."""
    key = stream if type(stream) is bytes else bytes(stream)
    described = _array_descriptions.get(key)
    if described is None:
        described = _parse_array_description(key)
        if len(_array_descriptions) < 64:  # a peer's made-up ones must not grow it without end
            _array_descriptions[key] = described
    if len(buffers) != 1:
        raise errors.ProtocolError("corrupt array description in an out-of-band frame")
    frombuffer, dtype, shape, order = described
    arr = frombuffer(buffers[0], dtype)  # positional: half the cost of dtype=
    # A 1-d array is already what reshape would make; anything else is reshaped (and a
    # shape that does not fit the buffer raises numpy's own ValueError).
    return arr if arr.shape == shape else arr.reshape(shape, order=order)


def _parse_array_description(stream: bytes) -> tuple:
    """(numpy.frombuffer, dtype, shape, order) of a FLAG_NDARRAY stream; ProtocolError if
    it is not one."""
    try:
        order, ndim, code_len = _ARRAY.unpack_from(stream)
        end = _ARRAY.size + ndim * 8
        shape = _array_dims(ndim).unpack_from(stream, _ARRAY.size)
        code = stream[end:]
        if len(code) != code_len or order not in (b"C", b"F"):
            raise ValueError
        numpy = sys.modules.get("numpy") or importlib.import_module("numpy")  # the sender had it
        dtype = numpy.dtype(code.decode("ascii"))
        if dtype.kind not in _ARRAY_KINDS:
            raise ValueError
    except (struct.error, ValueError, TypeError):
        raise errors.ProtocolError("corrupt array description in an out-of-band frame") from None
    return numpy.frombuffer, dtype, shape, "F" if order == b"F" else "C"


# FLAG_NDARRAY stream -> (numpy.frombuffer, dtype, shape, order), of the arrays received
# (a stream of arrays is usually of one shape and type: parsed once).
_array_descriptions: dict = {}


@functools.lru_cache(maxsize=None)
def _array_dims(ndim: int) -> struct.Struct:
    return struct.Struct(f"<{ndim}q")  # ndim < 256: a bounded cache


def _origin(obj: Any) -> Any:
    """The SharedBuffer or heap block (allocate_buffer) that ``obj`` views, if any.

    Follows ``base`` (numpy) and ``obj`` (memoryview) a few steps; None otherwise.
    """
    for _ in range(4):
        if isinstance(obj, SharedBuffer) or (_HeapBlock is not None and type(obj) is _HeapBlock):
            return obj
        nxt = getattr(obj, "base", None)
        if nxt is None:
            nxt = getattr(obj, "obj", None)
        if nxt is None or nxt is obj:
            return None
        obj = nxt
    return None


def _map_received(fd: int, size: int, writable: bool = True) -> mmap.mmap:
    """Map a received memfd and close the fd (the mapping keeps the pages); ProtocolError
    unless the peer sealed it at a size that covers ``size`` (else it could truncate it
    under us: SIGBUS)."""
    try:
        _core.check_memfd(fd, size)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, size, flags=_MAP_FLAGS, prot=prot)
    finally:
        os.close(fd)


class ShmTransport(Transport):
    """One end of a shared-memory pipe (see the module docstring)."""

    name = "shm"

    def __init__(self, endpoint: Any, rx_index: int, tx_index: int, options: dict[str, int]) -> None:
        self._ep = endpoint
        self._rx_index = rx_index
        self._tx_index = tx_index
        self._options = options
        endpoint.configure(
            spin_ns=options["spin_us"] * 1000,
            max_inflight_bytes=options["max_inflight_bytes"],
            max_inflight_fds=options["max_inflight_fds"],
        )
        self._inline = min(options["oob_threshold"] - 1, endpoint.max_payload)
        self._heap = options["heap_size"] > 0
        self._heap_sent = 0
        self._oob_threshold = self._inline + 1
        # Out-of-band buffers per message: their spans must fit in the frame (more go in band).
        self._max_oob_buffers = (self._inline - _OOB_HEAD.size) // _OOB_SPAN.size - 1
        self._send = endpoint.send
        self._recv = endpoint.recv
        # Payload size of the last inline frame that did not fit (arm_writable waits for it).
        self._blocked_size = 1
        self.capabilities = Capabilities(
            batch=True, out_of_band=True, writable_fd=hasattr(endpoint, "arm_writer")
        )
        self._reset_pickler()

    # -- pickling -------------------------------------------------------------------
    def _reset_pickler(self) -> None:
        self._pickle_file = io.BytesIO()
        self._oob_buffers: list[pickle_buffer] = []
        self._pickler = ForkingPickler(self._pickle_file, 5, True, self._buffer_callback)

    def _buffer_callback(self, buf: "pickle_buffer") -> bool:
        if len(self._oob_buffers) >= self._max_oob_buffers:
            return True  # in band: the frame has room for this many spans only
        with buf.raw() as raw:
            if raw.nbytes < self._oob_threshold:
                return True  # in band
        self._oob_buffers.append(buf)
        return False

    def _dumps(self) -> tuple[io.BytesIO, list]:
        f = self._pickle_file
        f.seek(0)
        f.truncate()
        self._oob_buffers = []
        self._pickler.clear_memo()
        return f, self._oob_buffers

    # -- sending --------------------------------------------------------------------
    def send_frame(self, data: memoryview, deadline: Deadline) -> None:
        if len(data) <= self._inline:
            try:
                self._send(data, deadline)
            except errors.TimeoutError:
                self._blocked_size = len(data)
                raise
        else:
            self._send_oob(_EMPTY, [_byte_view(data)], deadline)

    def send_frames(self, frames: list, deadline: Deadline) -> None:
        inline = self._inline
        start = 0
        for i, frame in enumerate(frames):
            if len(frame) > inline:
                if start < i:
                    self._ep.send_many(frames[start:i], deadline)
                self._send_oob(_EMPTY, [_byte_view(frame)], deadline)
                start = i + 1
        if start < len(frames):
            self._ep.send_many(frames[start:] if start else frames, deadline)

    def send_object(self, obj: Any, deadline: Deadline) -> None:
        numpy = sys.modules.get("numpy")
        if numpy is not None and type(obj) is numpy.ndarray and obj.nbytes >= self._oob_threshold:
            # A big plain array: described in a few bytes instead of pickled, the same
            # array for the receiver (pickle's own path would cost ~5 µs on each side).
            if obj.base is None and obj.flags.c_contiguous:
                # numpy's own memory (no view of shared pages to pass as they are), in C
                # order: its buffer is the bytes to copy (~3 µs less than the path below).
                stream = _owned_c_array_stream(obj)
                if stream is not None:
                    self._send_copy(stream, (obj,), deadline, FLAG_NDARRAY)
                    return
            stream = _array_stream(obj)
            if stream is not None:
                with pickle.PickleBuffer(obj).raw() as raw:
                    self._send_oob(memoryview(stream), [raw], deadline, FLAG_NDARRAY)
                return
        f, buffers = self._dumps()
        try:
            self._pickler.dump(obj)
        except BaseException:
            self._reset_pickler()  # a half-written pickler is not reusable
            raise
        pickled = f.getbuffer()
        try:
            if not buffers and len(pickled) <= self._inline:
                try:
                    self._send(pickled, deadline)
                except errors.TimeoutError:
                    self._blocked_size = len(pickled)
                    raise
            else:
                raws = [b.raw() for b in buffers]
                try:
                    self._send_oob(pickled, raws, deadline)
                finally:
                    for raw in raws:
                        raw.release()
        finally:
            pickled.release()
            self._oob_buffers = []
            # The memo refers to what was pickled: keep nothing of the caller's alive.
            self._pickler.clear_memo()

    def _send_oob(self, stream: memoryview, raws: list, deadline: Deadline, flags: int = 0) -> None:
        """Send a ``KIND_OOB`` frame: ``raws`` (flat byte views) out of band, ``stream``
        (empty for raw bytes) in the frame if it fits, else in the block with them;
        ``flags`` (FLAG_NDARRAY) say what the stream is.

        The ladder: the caller's own shared pages (allocate_buffer), sent as they are;
        else a copy into one block of our heap, or of a fresh memfd (``send_copy``, in C).
        """
        ep = self._ep
        spans_size = _OOB_HEAD.size + _OOB_SPAN.size * (len(raws) + 1)
        stream_fits = spans_size + len(stream) <= self._inline
        if len(raws) == 1 and stream_fits and raws[0].contiguous:
            raw = raws[0]
            origin = _origin(raw.obj)
            if isinstance(origin, SharedBuffer):
                if len(origin) == raw.nbytes:
                    head, size = _oob_head(raw.nbytes, _MEMFD, [(0, raw.nbytes)], len(stream))
                    ep.send_parts(KIND_OOB, FLAG_SHARED | flags, head, stream, (origin._hp_fd,), size, deadline)
                    return
            elif origin is not None:
                # A block of our own heap (allocate_buffer): the frame takes a reference
                # to it, nothing is copied.
                shared = ep.heap_share(origin, raw)
                if shared is not None:
                    base, at = shared
                    head, size = _oob_head(len(origin), base, [(at, raw.nbytes)], len(stream))
                    self._send_heap_frame(FLAG_SHARED | flags, head, size, stream, base, deadline)
                    return
        self._send_copy(stream, raws, deadline, flags)

    def _send_copy(self, stream: Any, buffers: Any, deadline: Deadline, flags: int) -> None:
        """Copy contiguous ``buffers`` (and ``stream`` if it does not fit in the frame) into
        a block and send its frame (``send_copy``, in C)."""
        if self._ep.send_copy(flags, stream, buffers, self._inline, deadline):
            self._heap_sent += 1

    def _send_heap_frame(self, flags: int, head: bytes, size: int, body: Any, base: int, deadline: Deadline) -> None:
        """Send a frame that refers to a block of our heap, which holds a reference for it."""
        try:
            self._ep.send_parts(KIND_OOB, flags, head, body, (), size, deadline)
        except BaseException:
            self._ep.heap_release(base)  # the frame was not sent: its reference goes
            raise
        self._heap_sent += 1

    def allocate_buffer(self, nbytes: int) -> Any:
        if nbytes == 0:
            return bytearray()
        if self._heap and nbytes >= self._inline:
            # A block of this pipe's heap: mapped on both sides already, reused once free.
            block = self._ep.heap_buffer(nbytes)
            if block is not None:
                return memoryview(block)
        return SharedBuffer._create(nbytes)

    def fast_path(self, connection: Any, methods: dict) -> Any:
        # In C: messages that fit inline, sent or received with no other thread inside
        # that direction, cost one C call instead of three Python frames and a lock.
        return self._ep.fast_path(connection, methods, self._inline)

    # -- receiving ------------------------------------------------------------------
    def recv_frame(self, maxlength: Optional[int], deadline: Deadline) -> Any:
        r = self._recv(maxlength, deadline)
        if type(r) is bytes:
            return r
        return self._oob_frame(r)

    def recv_frames(self, maxcount: int, deadline: Deadline) -> list:
        frames = self._ep.recv_many(maxcount, deadline)
        if frames and type(frames[0]) is tuple:
            frames[0] = self._oob_frame(frames[0])
        return frames

    def _oob_frame(self, r: tuple) -> Any:
        """A special frame as ``recv_bytes`` returns it: raw bytes as a read-only view; an
        object sent with ``send()`` as the stdlib gives it, an (in-band) pickle of it."""
        stream, buffers = self._open_oob(r, readonly=True)
        if not stream:
            return buffers[0]
        return dumps(self._loads(r[1], stream, buffers), 5)

    def recv_frame_into(self, buf: memoryview, offset: int, deadline: Deadline) -> int:
        r = self._ep.recv_into(buf, offset, deadline)
        if type(r) is int:
            return r
        frame = self._oob_frame(r)
        size = len(frame)
        if offset + size > len(buf):
            raise errors.BufferTooShort(bytes(frame))
        buf[offset : offset + size] = frame
        return size

    def recv_object(self, deadline: Deadline, copy: bool = True) -> Any:
        r = self._recv(None, deadline)
        if type(r) is bytes:
            return ForkingPickler.loads(r)
        stream, buffers = self._open_oob(r, readonly=not copy)
        if not stream:
            return ForkingPickler.loads(buffers[0])  # raw bytes, sent with send_bytes()
        return self._loads(r[1], stream, buffers)

    @staticmethod
    def _loads(flags: int, stream: Any, buffers: list) -> Any:
        if flags & FLAG_NDARRAY:
            return _array_from(stream, buffers)
        return ForkingPickler.loads(stream, buffers=buffers)

    def _open_oob(self, r: tuple, readonly: bool) -> tuple[Any, list]:
        """``(stream, buffers)`` of a received ``KIND_OOB`` frame, every span checked (in C).

        ``readonly``: views of the block (no copy). Otherwise buffers of our own: a heap
        block or private memfd is ours alone once received; a shared one is copied.
        """
        return self._ep.open_oob(r, readonly, _map_received)

    # -- readiness and lifetime -------------------------------------------------------
    def poll(self, deadline: Deadline) -> bool:
        return self._ep.poll(deadline)

    def fileno(self) -> int:
        return self._ep.fileno()

    def catch_incoming(self, max_seconds: float) -> bool:
        # The peer announced the big message it is copying to us: spin (GIL released, no
        # sleep) until it lands, cheaper than the event loop's sleep and wake-up.
        return self._ep.catch_incoming(max_seconds)

    def arm_writable(self) -> bool:
        return self._ep.arm_writer(self._blocked_size)

    def writable_fileno(self) -> tuple[int, int]:
        return self._ep.writer_fileno(), select.POLLIN

    def close(self) -> None:
        self._ep.close()

    @property
    def closed(self) -> bool:
        return self._ep.closed

    def after_fork_in_child(self) -> None:
        self._ep.after_fork()
        self._reset_pickler()

    def reduce(self) -> tuple:
        memfd, sock, rx_efd, tx_efd = self._ep.fds()
        dup = reduction.DupFd
        return _rebuild_shm_transport, (
            dup(memfd),
            dup(sock),
            dup(rx_efd) if rx_efd >= 0 else None,
            dup(tx_efd) if tx_efd >= 0 else None,
            self._rx_index,
            self._tx_index,
            self._options,
        )

    def statistics(self) -> dict:
        stats = dict(self._ep.stats()) if not self._ep.closed else {}
        stats["heap_sent"] = self._heap_sent
        stats.setdefault("heap_received", 0)
        stats["transport"] = self.name
        return stats


pickle_buffer = Any  # pickle.PickleBuffer, spelled loosely for 3.9 typing

def _rebuild_shm_transport(
    memfd: Any, sock: Any, rx: Any, tx: Any, rx_index: int, tx_index: int, options: dict
) -> ShmTransport:
    fds = [memfd.detach(), sock.detach(), rx.detach() if rx is not None else -1, tx.detach() if tx is not None else -1]
    return _make_end(fds, rx_index, tx_index, options)


def _make_end(fds: list, rx_index: int, tx_index: int, options: dict) -> ShmTransport:
    assert _core is not None
    try:
        ep = _core.Endpoint(fds[0], fds[1], fds[2], fds[3], rx_index, tx_index)
    except BaseException:
        # the Endpoint closes what it was given when it fails; nothing else to release
        raise
    return ShmTransport(ep, rx_index, tx_index, options)


def _check_options(options: dict) -> dict[str, int]:
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected shared-memory pipe option(s): {sorted(unknown)}")
    merged = dict(DEFAULT_OPTIONS)
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key} must be an int, not {type(value).__name__}")
        merged[key] = value
    ring = merged["ring_size"]
    if ring < 4096 or ring > (1 << 30) or ring & (ring - 1):
        raise ValueError("ring_size must be a power of two between 4 KiB and 1 GiB")
    heap = merged["heap_size"]
    if heap < 0 or heap > (1 << 36) or heap % _core.HEAP_GRANULE:
        raise ValueError(f"heap_size must be a multiple of {_core.HEAP_GRANULE} up to 64 GiB (0: no heap)")
    if merged["oob_threshold"] < 1:
        raise ValueError("oob_threshold must be positive")
    if merged["max_inflight_bytes"] < 1 or merged["max_inflight_fds"] < 1:
        raise ValueError("max_inflight_bytes and max_inflight_fds must be positive")
    if merged["spin_us"] < 0:
        raise ValueError("spin_us must be >= 0")
    return merged


def shm_pipe(duplex: bool = True, **options: Any) -> tuple[ShmTransport, ShmTransport]:
    """Two connected shared-memory transports, like ``multiprocessing.Pipe(duplex)``.

    With ``duplex=False`` the first end only receives and the second only sends.
    Options: see ``DEFAULT_OPTIONS``.
    """
    if not available():
        raise OSError("the shared-memory transport is not available here")
    opts = _check_options(options)
    owned: list[int] = []
    try:
        memfd = _core.segment_create(opts["ring_size"], 2 if duplex else 1, opts["heap_size"])
        owned.append(memfd)
        s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        owned += [s1.detach(), s2.detach()]
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        efd0 = os.eventfd(0, flags)  # ring 0: end2 -> end1
        owned.append(efd0)
        efd1 = -1
        if duplex:
            efd1 = os.eventfd(0, flags)  # ring 1: end1 -> end2
            owned.append(efd1)
        memfd2 = os.dup(memfd)
        owned.append(memfd2)
        efd0b = os.dup(efd0)
        owned.append(efd0b)
        efd1b = os.dup(efd1) if duplex else -1
        if duplex:
            owned.append(efd1b)
    except BaseException:
        for fd in owned:
            os.close(fd)
        raise
    sock1, sock2 = owned[1], owned[2]
    end2_fds = [memfd2, sock2, efd1b, efd0b]
    try:
        end1 = _make_end([memfd, sock1, efd0, efd1], 0, 1 if duplex else -1, opts)
    except BaseException:
        for fd in end2_fds:
            if fd >= 0:
                os.close(fd)
        raise
    try:
        end2 = _make_end(end2_fds, 1 if duplex else -1, 0, opts)
    except BaseException:
        end1.close()
        raise
    return end1, end2
