"""Stub of hyperpipe._core, the C binding of the shared-memory transport and of the socket
transport's fast path (src/hyperpipe/_core.c)."""

from typing import Any, Callable, Optional, Sequence, Union

from typing_extensions import Buffer

VERSION: int
MAX_FDS: int
HEAP_GRANULE: int
HEAP_BLOCK_HEADER: int  # a heap block's data starts this far into its first granule

def segment_create(capacity: int, nrings: int, heap_size: int = 0, /) -> int:
    """A new memfd holding an initialised segment (rings of `capacity` bytes, heaps)."""

def buffer_memfd(nbytes: int, /) -> int:
    """A memfd of `nbytes`, allocated now and sealed against resizing (writable)."""

def copy_stream_min() -> int:
    """From how many bytes a buffer is copied to the peer with non-temporal stores."""

def _copy_stream(dst: Buffer, src: Buffer, /) -> None:
    """Copy `src` into the start of `dst` with non-temporal stores (for tests)."""

def check_memfd(fd: int, size: int, /) -> None:
    """ProtocolError unless `fd` is a memfd sealed against resizing, at least `size` bytes."""

def _set_errors(
    timeout: type[BaseException],
    closed: type[BaseException],
    peer_closed: type[BaseException],
    broken_pipe: type[BaseException],
    protocol: type[BaseException],
    too_long: type[BaseException],
    buffer_too_short: type[BaseException],
    /,
) -> None: ...

class HeapBlock:
    """A received block of the sender's heap (buffer protocol); freed when it dies."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

# (kind, flags, payload, fds) of a frame that is not plain data
SpecialFrame = tuple[int, int, bytes, list[int]]

class Endpoint:
    """One end of a shared-memory pipe. Takes ownership of every fd it is given."""

    def __init__(
        self, memfd: int, sock: int, rx_efd: int, tx_efd: int, rx_index: int, tx_index: int
    ) -> None: ...
    @property
    def max_payload(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def configure(
        self, spin_ns: int = ..., max_inflight_bytes: int = ..., max_inflight_fds: int = ...
    ) -> None: ...
    def send(self, data: Buffer, deadline: Optional[float] = None, /) -> None: ...
    def send_many(self, frames: Sequence[Buffer], deadline: Optional[float] = None, /) -> int: ...
    def send_parts(
        self,
        kind: int,
        flags: int,
        head: Buffer,
        body: Optional[Buffer],
        fds: Sequence[int],
        oob_bytes: int,
        deadline: Optional[float],
        /,
    ) -> None:
        """One frame (head + body), after the fds."""
    def send_copy(
        self, flags: int, stream: Buffer, buffers: Sequence[Buffer], inline_max: int, deadline: Optional[float], /
    ) -> bool:
        """An out-of-band frame whose buffers are copied into one block (page-aligned spans),
        of our heap if it has room (True), else of a fresh memfd passed with it (False); the
        stream in the frame if it stays within inline_max bytes, else in the block."""
    def recv(
        self, maxlength: Optional[int] = None, deadline: Optional[float] = None, /
    ) -> Union[bytes, SpecialFrame]: ...
    def recv_many(
        self, maxcount: int, deadline: Optional[float] = None, /
    ) -> list[Any]:  # bytes, or one SpecialFrame alone
        ...
    def recv_into(
        self, buf: Buffer, offset: int, deadline: Optional[float] = None, /
    ) -> Union[int, SpecialFrame]: ...
    def fast_path(self, connection: Any, methods: dict[str, Any], inline_max: int, /) -> "Endpoint":
        """Make the four methods below act for that Connection (a weakref.ref to it; its own
        methods by name, for every call they do not handle); returns this endpoint."""
    def send_bytes(
        self, buf: Buffer, offset: int = 0, size: Optional[int] = None, *, timeout: Optional[float] = None
    ) -> None:
        """Connection.send_bytes: the common call in C, any other by the Connection's method."""
    def recv_bytes(self, maxlength: Optional[int] = None, *, timeout: Optional[float] = None) -> bytes:
        """Connection.recv_bytes: the common call in C, any other by the Connection's method."""
    def send_bytes_many(self, bufs: Sequence[Buffer], *, timeout: Optional[float] = None) -> None:
        """Connection.send_bytes_many: the common call in C, any other by the Connection's."""
    def recv_bytes_many(self, maxcount: int = 1024, *, timeout: Optional[float] = None) -> list[bytes]:
        """Connection.recv_bytes_many: the common call in C, any other by the Connection's."""
    sending: bool
    receiving: bool
    def poll(self, deadline: Optional[float] = None, /) -> bool: ...
    def fileno(self) -> int: ...
    def writer_fileno(self) -> int:
        """A process-local fd that poll() sees readable when the outgoing ring may have room
        for what arm_writer() armed, or the peer is gone or this end closed (spurious
        readiness is allowed)."""
    def arm_writer(self, nbytes: int, /) -> bool:
        """True if a frame with an `nbytes` payload fits now (nothing armed); else arm
        writer_fileno() for when the consumer frees space (stale readiness cleared, room
        checked again after arming) and return False."""
    def close(self) -> None: ...
    def after_fork(self) -> None: ...
    def fds(self) -> tuple[int, int, int, int]: ...
    def stats(self) -> dict[str, int]: ...
    def heap_alloc(self, nbytes: int, /) -> int: ...
    def heap_write(self, offset: int, data: Buffer, /) -> None: ...
    def heap_release(self, offset: int, /) -> None: ...
    def catch_incoming(self, max_seconds: float, /) -> bool: ...
    def heap_buffer(self, nbytes: int, /) -> Optional[HeapBlock]: ...
    def heap_share(self, block: object, data: Buffer, /) -> Optional[tuple[int, int]]: ...
    def open_oob(
        self, frame: SpecialFrame, readonly: bool, mapper: Callable[[int, int, bool], Buffer], /
    ) -> tuple[Buffer, list[Buffer]]:
        """(stream, buffers) of a received out-of-band frame, every field checked first
        (ProtocolError, its descriptors closed): views of a block of the peer's heap, or of
        the memfd `mapper(fd, size, writable)` maps; bytearray copies of a shared block's
        buffers unless `readonly`."""

class SocketFast:
    """A socket Connection's send_bytes/recv_bytes/send/recv for small frames (SocketTransport.fast_path).

    Its methods have the Connection's signatures (Connection.send_bytes and so on): one
    small buffer sent, or a receive with no argument, in C; send(obj) of a flat object
    (a scalar, a short tuple or list of them) pickled in C; any other call (and both
    batch methods) by the Connection's own method."""

    sending: bool
    receiving: bool
    connection_methods: tuple[str, ...]
    send_bytes: Callable[..., None]
    recv_bytes: Callable[..., bytes]
    send_bytes_many: Callable[..., None]
    recv_bytes_many: Callable[..., list[bytes]]
    send: Callable[..., None]
    recv: Callable[..., Any]

def socket_fast_path(
    connection: Any,
    methods: dict[str, Any],
    transport: Any,
    fd: int,
    send_limit: int,
    recv_limit: int,
    pickler: Optional[tuple[Callable[..., bytes], Callable[..., Any], int, int]],
    spin_ns: int = 0,
    /,
) -> SocketFast:
    """C versions of the Connection's methods named in `methods` (its own, for every call they
    do not handle) for `transport`, a plain-socket SocketTransport on `fd`: payloads up to
    `send_limit` are sent, and up to `recv_limit` received, in C. `pickler`: (dumps, loads,
    protocol, longest flat tuple or list) for send/recv of objects; None (a codec): the
    Connection's own. `spin_ns`: how long a receive with no deadline may spin (trying
    without waiting, yielding the CPU between tries) before it blocks; 0: never."""

# -- a queue's item in one call (_queues.py) -------------------------------------------------

QF_TO_FEEDER: int  # QueueFast.put: its place taken; no lock or room in time: queue it for the feeder
QF_SLOW_PUT: int  # QueueFast.put: its place taken; send it the Python way (big, out of band, an error)

class QueueFast:
    """A hyperpipe Queue's common put and get over shared memory, one C call each; one per
    queue and process (``stale`` once forked, or once its pickler failed)."""

    stale: bool

    def __init__(
        self, sem: Any, wlock: Any, rlock: Any, writer: Optional[Endpoint], reader: Optional[Endpoint],
        recv_lock: Any, pickler: Any, chunks: list, loads: Callable[[bytes], Any],
        loads_special: Callable[[Any], Any], special: Optional[Callable[[SpecialFrame], Any]],
        not_consumed: tuple[type[BaseException], ...], stale: object, empty: type[BaseException],
        inline_max: int, lock_yields: int, direct_wait: float, /,
    ) -> None: ...
    def put(self, obj: Any, /) -> Optional[int]:
        """None: sent; 0: nothing taken (the Python path puts it); QF_TO_FEEDER or QF_SLOW_PUT."""
    def get(self, block: bool, timeout: Optional[float], /) -> Any:
        """The next item, queue.Empty, or ``stale`` (the sentinel given) when the Python path
        must get it (nothing taken)."""

def _queue_encode(obj: Any, /) -> Optional[bytes]:
    """The C pickle of a plain item (None when the pickler takes it)."""

def _queue_decode(data: Buffer, /) -> tuple[Any, bool]:
    """(object, True) when the C decoder reads ``data``; (None, False) when pickle.loads must."""

# -- for event loops: hyperpipe.asyncio's first try (never waits, never raises for state) --
def aio_try_send_bytes(endpoint: Endpoint, buf: Buffer, /) -> bool:
    """True if `buf` went out now as one inline DATA frame (as Endpoint.send_bytes' fast
    path); False when anything else is needed (the caller goes the general way)."""

def aio_try_recv_bytes(endpoint: Endpoint, spin_seconds: float, /) -> Optional[bytes]:
    """The next DATA frame's bytes if one waits or arrives within `spin_seconds` (spun with
    the GIL released, never sleeping); None when anything else is needed."""
