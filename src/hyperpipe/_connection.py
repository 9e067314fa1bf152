"""``Connection``: the one public connection class, whatever moves its bytes.

Public methods check their arguments and the connection's state exactly once, as
``multiprocessing.connection._ConnectionBase`` does, turn ``timeout=`` into a deadline,
serialize each direction with a lock, and hand whole frames to a ``Transport``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from multiprocessing import reduction, util
from typing import TYPE_CHECKING, Any, Generic, Iterable, Optional, TypeVar

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

from . import errors
from ._transport import PASSED, Capabilities, Deadline, Transport

_ForkingPickler = reduction.ForkingPickler

# As typeshed's multiprocessing.connection stub: Connection[SendT, RecvT].
_SendT = TypeVar("_SendT", contravariant=True)
_RecvT = TypeVar("_RecvT", covariant=True)

# Every open Connection of this process, for the fork and exit hooks below.
_live: "weakref.WeakSet[Connection[Any, Any]]" = weakref.WeakSet()


def _deadline(timeout: Optional[float]) -> Deadline:
    if timeout is None:
        return None
    if timeout != timeout:  # NaN
        raise ValueError("timeout must be a number or None")
    return time.monotonic() + max(0.0, float(timeout))


def _acquire(lock: Any, deadline: Deadline, what: str) -> None:
    if lock.acquire(False):  # uncontended, the usual case: no clock, no timed wait
        return
    if deadline is None:
        lock.acquire()
        return
    if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise errors.TimeoutError(f"{what} timed out waiting for another thread")


# bytes objects up to this size go to the transport as they are (the common small message).
_SMALL = 16384


def _slice(m: memoryview, offset: int, size: Optional[int]) -> memoryview:
    """``m[offset:offset+size]`` with the standard library's checks and messages."""
    n = m.nbytes
    if offset < 0:
        raise ValueError("offset is negative")
    if n < offset:
        raise ValueError("buffer length < offset")
    if size is None:
        size = n - offset
    elif size < 0:
        raise ValueError("size is negative")
    elif offset + size > n:
        raise ValueError("buffer length < offset + size")
    return m[offset : offset + size]


def _byte_view(buf: Any) -> memoryview:
    m = memoryview(buf)
    if not m.c_contiguous:  # here, before a batch sent part of its messages
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    if m.ndim != 1 or m.format not in ("B", "b", "c"):
        m = m.cast("B")
    elif m.format != "B":
        m = m.cast("B")
    return m


class Connection(Generic[_SendT, _RecvT]):
    """One end of a hyperpipe connection; a drop-in for ``multiprocessing.connection.Connection``.

    Same methods, arguments, return values and exceptions as the standard library's
    class. Additions are keyword-only: ``timeout=`` on every blocking method, ``copy=``
    on ``recv``, batch methods, ``transport`` and ``statistics()``. Unlike the standard
    library, several threads may send and receive at once (each message goes out and
    comes in whole), and ``close()`` from another thread wakes calls blocked on it.

    ``Connection(handle)`` with a file descriptor wraps a socket or pipe fd speaking the
    standard library's wire format, like ``multiprocessing.connection.Connection(handle)``.
    """

    def __init__(
        self,
        transport: Any,
        readable: bool = True,
        writable: bool = True,
        *,
        codec: Any = None,
    ) -> None:
        if not readable and not writable:
            raise ValueError("at least one of `readable` and `writable` must be True")
        if not isinstance(transport, Transport):
            from ._socket_transport import SocketTransport

            handle = transport.__index__()
            if handle < 0:
                raise ValueError("invalid handle")
            transport = SocketTransport(handle)
        self._transport: Optional[Transport] = transport
        self._readable = readable
        self._writable = writable
        self._codec = codec
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        _live.add(self)
        # The transport may do the common send_bytes/recv_bytes call without this class
        # (see Transport.fast_path); every other call still comes here.
        self._fast = transport.fast_path(weakref.ref(self), _FAST_METHODS)
        if self._fast is not None:
            offered = getattr(self._fast, "connection_methods", _FAST_BYTES)
            for name in (_FAST_SENDING if writable else ()) + (_FAST_RECEIVING if readable else ()):
                if name in offered:
                    setattr(self, name, getattr(self._fast, name))

    # -- state ----------------------------------------------------------------------
    def __del__(self) -> None:
        transport = getattr(self, "_transport", None)
        if transport is not None:
            self._transport = None
            try:
                transport.close()
            except Exception:
                pass

    def _open_transport(self) -> Transport:
        transport = self._transport
        if transport is None:
            raise errors.ConnectionClosedError()
        return transport

    def _bad_message_length(self) -> None:
        if self._writable:
            self._readable = False
            self._drop_fast_path(recv=True)
        else:
            self.close()

    def _drop_fast_path(self, send: bool = False, recv: bool = False) -> None:
        fast = self._fast
        if fast is None:
            return
        if send:
            fast.sending = False
            for name in _FAST_SENDING:
                self.__dict__.pop(name, None)
        if recv:
            fast.receiving = False
            for name in _FAST_RECEIVING:
                self.__dict__.pop(name, None)

    @property
    def closed(self) -> bool:
        """True if the connection is closed."""
        return self._transport is None

    @property
    def readable(self) -> bool:
        """True if the connection is readable."""
        return self._readable

    @property
    def writable(self) -> bool:
        """True if the connection is writable."""
        return self._writable

    @property
    def transport(self) -> str:
        """Name of the transport moving this connection's bytes: ``"shm"`` or ``"socket"``."""
        return self._open_transport().name

    def fileno(self) -> int:
        """File descriptor of the connection; ``select`` sees it readable when data is ready."""
        return self._open_transport().fileno()

    def close(self) -> None:
        """Close the connection. Threads blocked on it wake with ``ConnectionClosedError``."""
        transport = self._transport
        if transport is not None:
            self._transport = None
            _live.discard(self)
            self._drop_fast_path(send=True, recv=True)
            transport.close()

    def statistics(self) -> dict:
        """Counters and facts about this end (transport name and transport-specific keys)."""
        return self._open_transport().statistics()

    def __enter__(self) -> "Connection[_SendT, _RecvT]":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._transport is None else self._transport.name
        mode = ("r" if self._readable else "") + ("w" if self._writable else "")
        return f"<hyperpipe.Connection {state} {mode}>"

    # -- checks ---------------------------------------------------------------------
    def _for_sending(self) -> Transport:
        transport = self._transport
        if transport is None:
            raise errors.ConnectionClosedError()
        if not self._writable:
            raise errors.DirectionError("connection is read-only")
        return transport

    def _for_receiving(self) -> Transport:
        transport = self._transport
        if transport is None:
            raise errors.ConnectionClosedError()
        if not self._readable:
            raise errors.DirectionError("connection is write-only")
        return transport

    # -- sending --------------------------------------------------------------------
    def send_bytes(
        self,
        buf: "ReadableBuffer",
        offset: int = 0,
        size: Optional[int] = None,
        *,
        timeout: Optional[float] = None,
    ) -> None:
        """Send the bytes data from a bytes-like object (``buf[offset:offset+size]``)."""
        transport = self._transport
        if transport is None or not self._writable:
            transport = self._for_sending()
        if type(buf) is bytes and not offset and size is None and len(buf) <= _SMALL:
            m: Any = buf  # the hot path: no memoryview, no checks needed
        else:
            m = _byte_view(buf)
            if offset or size is not None:
                m = _slice(m, offset, size)
        if timeout is None:
            lock = self._send_lock
            lock.acquire()  # not `with`: a with-statement costs as much again (issue 11)
            try:
                transport.send_frame(m, None)
            finally:
                lock.release()
            return
        deadline = _deadline(timeout)
        lock = self._send_lock
        _acquire(lock, deadline, "send_bytes")
        try:
            transport.send_frame(m, deadline)
        finally:
            lock.release()

    def send(self, obj: _SendT, *, timeout: Optional[float] = None) -> None:
        """Send a picklable object (or one the connection's codec can encode)."""
        transport = self._transport
        if transport is None or not self._writable:
            transport = self._for_sending()
        codec = self._codec
        if codec is None and timeout is None:
            # The transport pickles completely before writing: an unpicklable object
            # raises with nothing sent.
            lock = self._send_lock
            lock.acquire()  # not `with`: a with-statement costs as much again (issue 11)
            try:
                transport.send_object(obj, None)
            finally:
                lock.release()
            return
        deadline = _deadline(timeout)
        # Serialize before taking the lock: an unpicklable object raises here, nothing sent.
        data = None if codec is None else _byte_view(codec.dumps(obj))
        lock = self._send_lock
        _acquire(lock, deadline, "send")
        try:
            if data is None:
                transport.send_object(obj, deadline)
            else:
                transport.send_frame(data, deadline)
        finally:
            lock.release()

    def send_bytes_many(
        self, bufs: "Iterable[ReadableBuffer]", *, timeout: Optional[float] = None
    ) -> None:
        """Send each buffer of ``bufs`` as its own message (fewer wake-ups than a loop)."""
        transport = self._for_sending()
        views = [_byte_view(b) for b in bufs]
        deadline = _deadline(timeout)
        lock = self._send_lock
        _acquire(lock, deadline, "send_bytes_many")
        try:
            transport.send_frames(views, deadline)
        finally:
            lock.release()

    def allocate_buffer(self, nbytes: int) -> Any:
        """A writable shared buffer of ``nbytes`` that ``send``/``send_bytes`` pass without copying.

        Fill it (``numpy.frombuffer(buf, dtype)`` gives an array over it) and send it, or an
        array over it, on this connection: the receiver gets the same pages (read-only
        views with ``recv(copy=False)``, a private copy with ``copy=True``). The buffer stays
        shared: what you write after sending, a view still receiving it sees. Only the
        shared-memory transport has them; others raise ``NotImplementedError``.
        """
        transport = self._for_sending()
        if nbytes < 0:
            raise ValueError("nbytes is negative")
        return transport.allocate_buffer(nbytes)

    # -- receiving ------------------------------------------------------------------
    def recv_bytes(self, maxlength: Optional[int] = None, *, timeout: Optional[float] = None) -> bytes:
        """Receive one message as ``bytes``; longer than ``maxlength`` -> OSError, as the stdlib."""
        transport = self._transport
        if transport is None or not self._readable:
            transport = self._for_receiving()
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        if timeout is None:
            lock = self._recv_lock
            lock.acquire()
            deadline = None
        else:
            deadline = _deadline(timeout)
            lock = self._recv_lock
            _acquire(lock, deadline, "recv_bytes")
        try:
            frame = transport.recv_frame(maxlength, deadline)
        except errors.MessageTooLongError:
            self._bad_message_length()
            raise
        finally:
            lock.release()
        return frame if type(frame) is bytes else bytes(frame)

    def recv_bytes_into(self, buf: Any, offset: int = 0, *, timeout: Optional[float] = None) -> int:
        """Receive one message into a writable buffer at byte ``offset``; return its size.

        A message that does not fit raises ``BufferTooShort`` holding the whole message.
        """
        transport = self._for_receiving()
        with memoryview(buf) as m:
            if m.readonly:
                raise TypeError("recv_bytes_into() argument must be a writable buffer")
            bytesize = m.nbytes
            if offset < 0:
                raise ValueError("negative offset")
            elif offset > bytesize:
                raise ValueError("offset too large")
            target = m if (m.ndim == 1 and m.format == "B") else m.cast("B")
            deadline = _deadline(timeout)
            lock = self._recv_lock
            _acquire(lock, deadline, "recv_bytes_into")
            try:
                return transport.recv_frame_into(target, offset, deadline)
            finally:
                lock.release()

    def recv(self, *, timeout: Optional[float] = None, copy: bool = True) -> _RecvT:
        """Receive one object.

        ``copy=True`` (the default): every buffer of the object is the receiver's alone,
        writable and written by no other process. ``copy=False``: out-of-band buffers
        (64 KiB or more, shared-memory transport) may be read-only views of shared memory
        instead, with no copy; one the sender filled through ``allocate_buffer`` stays
        shared with it, so its later writes show through. Other transports ignore it.
        """
        transport = self._transport
        if transport is None or not self._readable:
            transport = self._for_receiving()
        codec = self._codec
        if codec is None and timeout is None:
            lock = self._recv_lock
            lock.acquire()  # not `with`: a with-statement costs as much again (issue 11)
            try:
                return transport.recv_object(None, copy)
            finally:
                lock.release()
        deadline = _deadline(timeout)
        lock = self._recv_lock
        _acquire(lock, deadline, "recv")
        try:
            if codec is None:
                return transport.recv_object(deadline, copy)
            frame = transport.recv_frame(None, deadline)
        finally:
            lock.release()
        return codec.loads(frame)

    def recv_bytes_many(
        self, maxcount: int = 1024, *, timeout: Optional[float] = None
    ) -> list[bytes]:
        """Wait for one message, then also take those already waiting, up to ``maxcount``."""
        transport = self._for_receiving()
        if maxcount < 1:
            raise ValueError("maxcount must be at least 1")
        deadline = _deadline(timeout)
        lock = self._recv_lock
        _acquire(lock, deadline, "recv_bytes_many")
        try:
            frames = transport.recv_frames(maxcount, deadline)
        finally:
            lock.release()
        return [f if type(f) is bytes else bytes(f) for f in frames]

    def poll(self, timeout: Optional[float] = 0.0) -> bool:
        """Whether there is any input available to be read (``None`` waits forever).

        While another thread is receiving, the answer is about data this thread could
        read: ``False`` once ``timeout`` passes with that receive still going on.
        """
        transport = self._for_receiving()
        if timeout is None:
            deadline = None
        elif timeout != timeout:  # NaN
            raise ValueError("timeout must be a number or None")
        elif timeout <= 0:
            deadline = PASSED
        else:
            deadline = time.monotonic() + timeout
        # Under the receive lock: transports keep per-receiver state (partial frames,
        # wake tokens) that poll() touches too.
        lock = self._recv_lock
        if not lock.acquire(False):
            if deadline is None:
                lock.acquire()
            elif not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return False
        try:
            return transport.poll(deadline)
        finally:
            lock.release()

    # -- for event loops (hyperpipe.asyncio uses these) ----------------------------------
    @property
    def capabilities(self) -> Capabilities:
        """What the transport offers beyond the basics (batches, shared buffers, descriptors)."""
        return self._open_transport().capabilities

    def catch_incoming(self, max_seconds: float) -> bool:
        """If the peer is visibly about to deliver a message (shared memory: it announced a
        big copy to us), wait for it without sleeping, at most ``max_seconds``: an event
        loop calls this before it sleeps on ``fileno()``. True if a message waits."""
        return self._for_receiving().catch_incoming(max_seconds)

    def arm_writable(self) -> bool:
        """After a send timed out: True if it may be retried at once; False once armed, then
        wait on ``writable_fileno()`` before retrying (``capabilities.writable_fd``)."""
        return self._for_sending().arm_writable()

    def writable_fileno(self) -> tuple[int, int]:
        """``(fd, event)`` an event loop waits on for room to write: ``select.POLLOUT``
        means wait until ``fd`` is writable, ``select.POLLIN`` until it is readable."""
        return self._for_sending().writable_fileno()

    def send_backlog(self) -> int:
        """Bytes of accepted messages the transport has not yet handed to the system (the
        socket transport finishes a big message in the background)."""
        return self._for_sending().send_backlog()

    # -- travelling to other processes ------------------------------------------------
    def __reduce__(self) -> tuple:
        transport = self._open_transport()
        return (
            _rebuild_connection,
            (transport.reduce(), self._readable, self._writable, self._codec),
        )


# The methods a transport's fast_path may take over (those its object lists in
# `connection_methods`; without it, the four bytes methods), and the Connection's own ones
# it hands every other call to.
_FAST_SENDING = ("send_bytes", "send_bytes_many", "send")
_FAST_RECEIVING = ("recv_bytes", "recv_bytes_many", "recv")
_FAST_BYTES = ("send_bytes", "send_bytes_many", "recv_bytes", "recv_bytes_many")
_FAST_METHODS = {name: getattr(Connection, name) for name in _FAST_SENDING + _FAST_RECEIVING}


def fast_path_of(conn: Connection[Any, Any]) -> Any:
    """The object doing ``conn``'s common calls for its transport (``Transport.fast_path``),
    or None: for ``hyperpipe.asyncio``'s first try, which hands a shared-memory one to the
    C core's non-waiting calls. None once the connection is closed."""
    return conn._fast if conn._transport is not None else None


def _rebuild_connection(reduced: tuple, readable: bool, writable: bool, codec: Any) -> Connection:
    rebuild, args = reduced
    return Connection(rebuild(*args), readable, writable, codec=codec)


# -- the one owner of every connection's life in this process ---------------------------
#
# One fork hook and one exit path for every transport (transports register none of their
# own). docs/design.md, "Lifecycle", says what happens at exit and why in this order.


def _after_fork_in_child() -> None:
    # Every fork, multiprocessing's or not: the parent's threads (and the locks they may
    # hold) do not exist here, and each transport drops its per-process state once.
    for conn in list(_live):
        conn._send_lock = threading.Lock()
        conn._recv_lock = threading.Lock()
        transport = conn._transport
        if transport is not None:
            transport.after_fork_in_child()
    # The inherited exit closer is the parent's (a Finalize ignores other processes').
    _register_exit_closer()


def _feeding_queue_threads() -> set[int]:
    """ids of the Connections a live ``multiprocessing.Queue`` feeder thread uses.

    The feeder's arguments hold bound methods of the queue's two connections (their
    order differs between Python versions, so all of them are scanned). The feeder
    flushes what was put and closes the writer itself, joined at exit priority -5.
    """
    queues = sys.modules.get("multiprocessing.queues")
    if queues is None:
        return set()
    feed = queues.Queue._feed
    found = set()
    for thread in threading.enumerate():
        if getattr(thread, "_target", None) is not feed:
            continue
        for arg in getattr(thread, "_args", ()):
            owner = getattr(arg, "__self__", arg)
            if isinstance(owner, Connection):
                found.add(id(owner))
    return found


def _join_non_daemon_threads() -> None:
    # The main process joined them before exit functions run; a child started by
    # multiprocessing runs its exit function first (Process._bootstrap) and joins them
    # after: join them now, as the stdlib will, so that what they send is not cut off.
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon and thread is not threading.main_thread():
            thread.join()


def _close_at_exit() -> None:
    """Close every connection that can no longer deliver data, at process exit.

    Runs as a ``multiprocessing.util.Finalize`` of priority 0: after user atexit handlers
    registered after ``import multiprocessing``, after non-daemon threads ended and after
    higher-priority finalizers (Pool's, Queue's sentinel, native queues' flush); before
    multiprocessing joins the children, so a child blocked in ``recv`` on a connection we
    hold gets EOFError instead of waiting for us forever.
    """
    _join_non_daemon_threads()
    kept = _feeding_queue_threads()
    for conn in list(_live):
        if id(conn) in kept:
            continue
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - exiting: one broken end must not keep the rest open
            pass


_exit_closer: Optional[util.Finalize] = None


def _register_exit_closer(_: Any = None) -> None:
    global _exit_closer
    if _exit_closer is not None:
        _exit_closer.cancel()
    _exit_closer = util.Finalize(None, _close_at_exit, exitpriority=0)


_register_exit_closer()
os.register_at_fork(after_in_child=_after_fork_in_child)
# A child started by multiprocessing clears the finalizers it inherited or unpickled
# (Process._bootstrap) and then runs these: register the exit closer again there.
util.register_after_fork(_close_at_exit, _register_exit_closer)
