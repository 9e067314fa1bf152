"""Socket framing without I/O: every frame format the socket transport and the handshake speak.

Frames (docs/wire.md has the full description):

- **stdlib frame** (what ``multiprocessing.connection`` writes and reads): a 4-byte big-endian
  signed length ``!i``, then the payload; a payload longer than ``2**31 - 1`` bytes is
  announced by ``!i -1`` followed by ``!Q`` length.
- **out-of-band frame** (hyperpipe to hyperpipe only, after the peer announced it reads
  them): ``!i -2``, ``!QI`` (pickle stream length, buffer count), one ``!Q`` length per
  buffer, then the pickle-5 stream and each buffer's bytes in order. The buffers are the
  stream's out-of-band ``PickleBuffer``s, written from the sender's memory with one
  scatter-gather call and read straight into the buffers the objects are rebuilt on.

Writing is ``frame_views``/``oob_views`` (lists of buffers for one ``sendmsg``); reading is
``FrameReader``, a state machine told where the next bytes are to go (``target()``) and how
many arrived (``advance(n)``). It never reads past a frame, never trusts a length before
checking it, and commits memory for a frame only as fast as its bytes can arrive.
"""

from __future__ import annotations

import io
import mmap
import pickle
import struct
from multiprocessing.reduction import ForkingPickler
from typing import Any, Optional, Sequence, Union

from . import _pickling, errors

HEADER = struct.Struct("!i")
LONG_LENGTH = struct.Struct("!Q")
OOB_META = struct.Struct("!QI")
LONG_MARK = -1
OOB_MARK = -2
MAX_SHORT = 0x7FFFFFFF
MAX_LENGTH = (1 << 63) - 1
#: More buffers than this in one out-of-band frame is a corrupt frame.
MAX_OOB_BUFFERS = 1 << 16
#: Buffers smaller than this stay inside the pickle stream (a copy is cheaper than a part).
OOB_MIN_BUFFER = 64 << 10
#: Below this, a frame's header and payload are joined into one buffer (one write, no Nagle wait).
JOIN_LIMIT = 16384
#: Frame parts up to this size get an ordinary bytearray; bigger ones an anonymous mapping,
#: whose pages are only committed as the bytes arrive (a hostile length costs address space).
EAGER_ALLOC = 16 << 20

#: The pickle protocol of out-of-band streams (the first with ``PickleBuffer``).
OOB_PROTOCOL = 5


def header(size: int) -> bytes:
    """The stdlib header for a payload of ``size`` bytes."""
    if size > MAX_SHORT:
        return HEADER.pack(LONG_MARK) + LONG_LENGTH.pack(size)
    return HEADER.pack(size)


def frame_views(data: Any) -> list:
    """One stdlib frame as buffers for a scatter-gather write (small ones joined)."""
    size = len(data)
    if size <= JOIN_LIMIT:
        return [memoryview(HEADER.pack(size) + data)]
    return [memoryview(header(size)), data]


# Objects of these types pickle the same with or without ForkingPickler's reducers.
_FLAT_TYPES = frozenset({bytes, str, int, float, bool, type(None)})
#: The longest tuple or list pickled without a ForkingPickler (``_core.SocketFast`` too).
FLAT_MAX_ITEMS = 16


def _is_flat(obj: Any) -> bool:
    """A scalar, or a short tuple/list of scalars: no reducer, no buffer can be involved."""
    kind = type(obj)
    if kind in _FLAT_TYPES:
        return True
    if (kind is tuple or kind is list) and len(obj) <= FLAT_MAX_ITEMS:
        return all(map(_FLAT_TYPES.__contains__, map(type, obj)))  # no generator: faster
    return False


def dumps(obj: Any) -> Any:
    """``ForkingPickler.dumps(obj)``, byte for byte; small flat objects skip building a
    ForkingPickler (its dispatch-table copy is most of the cost of a small message)."""
    if _is_flat(obj):
        return pickle.dumps(obj)
    return _pickling.dumps(obj)


def dumps_oob(obj: Any) -> tuple[Any, Sequence[memoryview]]:
    """Pickle ``obj`` (protocol 5), leaving big contiguous buffers out of the stream.

    Returns the stream (a bytes-like object) and the out-of-band buffers (flat byte views
    of the sender's own memory, nothing copied); with no buffers the stream is an ordinary
    in-band pickle.
    """
    if _is_flat(obj):
        return pickle.dumps(obj, OOB_PROTOCOL), ()  # the common small message: no allocations
    buffers: list[memoryview] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()  # flat, C-contiguous bytes; raises for a non-contiguous one
        if raw.nbytes < OOB_MIN_BUFFER:
            return True  # in-band
        buffers.append(raw)
        return False

    stream = io.BytesIO()
    ForkingPickler(stream, OOB_PROTOCOL, True, out_of_band).dump(obj)  # positional only
    return memoryview(stream.getvalue()), buffers  # no BytesIO view: see _pickling


def oob_views(stream: Any, buffers: Sequence) -> list:
    """An out-of-band frame as buffers for a scatter-gather write."""
    head = HEADER.pack(OOB_MARK) + OOB_META.pack(len(stream), len(buffers))
    head += b"".join(LONG_LENGTH.pack(b.nbytes) for b in buffers)
    return [memoryview(head), stream, *buffers]


class OobFrame:
    """A received out-of-band frame: a pickle stream and the buffers it refers to."""

    __slots__ = ("stream", "buffers")

    def __init__(self, stream: Any, buffers: list) -> None:
        self.stream = stream
        self.buffers = buffers

    def loads(self) -> Any:
        return pickle.loads(self.stream, buffers=self.buffers)

    def in_band(self) -> bytes:
        """The same object as one stdlib pickle, for a caller that asked for bytes."""
        return _pickling.dumps(self.loads(), OOB_PROTOCOL)


class Direct:
    """A stdlib frame whose payload was read straight into the caller's buffer."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def _allocate(size: int) -> Union[bytearray, mmap.mmap]:
    if size <= EAGER_ALLOC:
        return bytearray(size)
    try:
        return mmap.mmap(-1, size)
    except (OSError, OverflowError, ValueError) as exc:
        raise errors.ProtocolError(f"cannot reserve {size} bytes for a frame: {exc}") from None


# FrameReader stages
_HEAD, _LONG, _META, _LENGTHS, _PARTS = range(5)


class FrameReader:
    """The receive side of the framing: one frame at a time, resumable after any short read.

    Per call the owner may set ``maxlength`` (a longer frame raises ``MessageTooLongError``
    from its header, its payload unread: the stdlib's "bad message length") and ``into``
    (``(buffer, offset)``: a big stdlib payload that fits is read straight into it).
    ``max_size`` is the connection's ``max_message_size``; a frame announcing more is
    refused the same way. ``oob=False`` (the handshake) refuses out-of-band frames.
    """

    def __init__(self, max_size: Optional[int] = None, *, oob: bool = True) -> None:
        self.max_size = max_size
        self.oob = oob
        self.maxlength: Optional[int] = None
        self.into: Optional[tuple] = None
        self._head = bytearray(16)
        self.reset()

    def reset(self) -> None:
        #: True once any byte of a frame has been consumed.
        self.in_frame = False
        self._stage = _HEAD
        self._got = 0  # bytes of the current piece (header part or frame part) received
        self._need = 4
        self._lengths = bytearray()
        self._sizes: list[int] = []  # the frame's parts: [payload] or [stream, *buffers]
        self._parts: list[Any] = []
        self._direct = False
        self._is_oob = False

    def target(self) -> memoryview:
        """Where the next bytes of the stream go (never empty)."""
        stage = self._stage
        if stage == _HEAD:
            return memoryview(self._head)[self._got : 4]
        if stage in (_LONG, _META):
            return memoryview(self._head)[4 + self._got : 4 + self._need]
        if stage == _LENGTHS:
            return memoryview(self._lengths)[self._got :]
        part = self._parts[-1]
        if self._direct:
            buf, offset = self.into  # type: ignore[misc]
            return buf[offset + self._got : offset + self._sizes[0]]
        return memoryview(part)[self._got :]

    def feed(self, data: bytes) -> Any:
        """Consume ``data`` (bytes read elsewhere, all of one frame); the frame if it completed."""
        view = memoryview(data)
        frame = None
        while view:
            target = self.target()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            view = view[n:]
            frame = self.advance(n)
        return frame

    def advance(self, n: int) -> Any:
        """``n`` bytes were written into ``target()``: the frame once complete, else None."""
        self._got += n
        self.in_frame = True
        while self._got == self._need:
            frame = self._next_piece()
            if frame is not None:
                return frame
        return None

    # -- moving from one piece to the next -------------------------------------------------
    def _next_piece(self) -> Any:
        stage = self._stage
        if stage == _HEAD:
            (size,) = HEADER.unpack_from(self._head, 0)
            if size == LONG_MARK:
                return self._expect(_LONG, LONG_LENGTH.size)
            if size == OOB_MARK and self.oob:
                self._is_oob = True
                return self._expect(_META, OOB_META.size)
            if size < 0:
                raise errors.ProtocolError(f"corrupt frame header (length {size})")
            return self._start_parts([size])
        if stage == _LONG:
            (size,) = LONG_LENGTH.unpack_from(self._head, 4)
            return self._start_parts([size])
        if stage == _META:
            stream_size, count = OOB_META.unpack_from(self._head, 4)
            if count > MAX_OOB_BUFFERS or stream_size > MAX_LENGTH:
                raise errors.ProtocolError(
                    f"corrupt out-of-band frame header ({count} buffers, stream {stream_size})"
                )
            self._sizes = [stream_size]
            if count == 0:
                return self._start_parts(self._sizes)
            self._lengths = bytearray(LONG_LENGTH.size * count)
            return self._expect(_LENGTHS, len(self._lengths))
        if stage == _LENGTHS:
            self._sizes += [n for (n,) in LONG_LENGTH.iter_unpack(self._lengths)]
            return self._start_parts(self._sizes)
        # A part is complete: the next one, or the whole frame.
        if len(self._parts) < len(self._sizes):
            return self._open_part()
        return self._finish()

    def _expect(self, stage: int, need: int) -> None:
        self._stage, self._got, self._need = stage, 0, need
        return None

    def _start_parts(self, sizes: list[int]) -> Any:
        total = sum(sizes)
        # maxlength first: the stdlib answers "bad message length" for any length over it
        if self.maxlength is not None and total > self.maxlength:
            raise errors.MessageTooLongError()
        if total > MAX_LENGTH:
            raise errors.ProtocolError(f"corrupt frame header (length {total})")
        if self.max_size is not None and total > self.max_size:
            raise errors.MessageTooLongError(
                f"message of {total} bytes exceeds max_message_size={self.max_size}"
            )
        self._sizes = sizes
        self._stage = _PARTS
        into = self.into
        if (
            not self._is_oob
            and into is not None
            and sizes[0] > JOIN_LIMIT
            and into[1] + sizes[0] <= len(into[0])
        ):
            self._direct = True
            self._parts = [None]
            self._got, self._need = 0, sizes[0]
            return None
        return self._open_part()

    def _open_part(self) -> None:
        # An empty part completes at once: advance() loops while got == need.
        size = self._sizes[len(self._parts)]
        self._parts.append(_allocate(size))
        self._got, self._need = 0, size

    def _finish(self) -> Any:
        if self._direct:
            frame: Any = Direct(self._sizes[0])
        elif self._is_oob:
            frame = OobFrame(self._parts[0], self._parts[1:])
        else:
            frame = self._parts[0]
        self.reset()
        return frame

    def keep_partial(self) -> None:
        """The call that set ``into`` is leaving: if the payload was going into the caller's
        buffer, copy what came into one of our own, so that any later call can finish it."""
        if self._direct and self._stage == _PARTS:
            buf, offset = self.into  # type: ignore[misc]
            own = _allocate(self._sizes[0])
            own[: self._got] = buf[offset : offset + self._got]
            self._parts = [own]
            self._direct = False
