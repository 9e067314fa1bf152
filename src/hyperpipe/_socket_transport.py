"""The socket transport: frames over a stream socket or a pipe, in the standard library's format.

Wire format (identical to ``multiprocessing.connection.Connection`` on POSIX): a 4-byte
big-endian signed length ``!i``, or ``-1`` followed by an 8-byte ``!Q`` length when the
message is longer than 2**31 - 1 bytes; then the payload. Frames are read exactly (no
read-ahead), so several processes may share one end under a lock as with the stdlib, and
``send_handle``/``recv_handle`` can use the descriptor between frames.

Unlike the standard library, every wait goes through ``poll()`` with a deadline and a
wake-up descriptor, so that

- a receive that times out keeps the part of the frame that arrived (``_RxState``) and the
  next call continues it;
- a send that times out before its first byte leaves nothing in the stream; once a frame
  has started, what could not be written by the deadline is parked and written by a
  background thread as the peer reads: the frame is accepted, as if the kernel buffer were
  larger, and is never cut in half (``send_backlog()``/``flush()`` expose it);
- ``close()`` from another thread wakes blocked calls (they raise ``ConnectionClosedError``),
  and the descriptor is only closed once no call is using it (no fd-reuse race);
- memory for a frame is committed as its bytes arrive (at most ``_EAGER_ALLOC`` ahead), so
  a hostile length header cannot make us allocate gigabytes up front.

The common case has a short path in each direction (``_receive_new``, ``send_frame``): a
header read and a small body read, or one write, with no state kept unless a call falls
short, in which case the state machine above takes over with what arrived.

The descriptor itself stays in blocking mode for sockets (``MSG_DONTWAIT`` per call), because
``multiprocessing.reduction.send_handle`` / ``recv_handle`` use it directly; pipe ends are
switched to non-blocking mode (they cannot carry handles).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, NoReturn, Optional

from . import errors
from ._pickling import dumps
from ._transport import Capabilities, Deadline, Transport, poll_ms

_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")
_LONG_MARK = -1
_MAX_SHORT = 0x7FFFFFFF
# Below this size the header and payload are joined and written with one call.
_JOIN_LIMIT = 16384
# Largest single read/write call (keeps memoryview slices and syscalls bounded).
_IO_CHUNK = 1 << 30
# A frame's buffer never runs ahead of the bytes received by more than this.
_EAGER_ALLOC = 16 << 20
# Frames up to this size are read with recv() into a bytes object directly.
_SMALL_FRAME = 65536

_DONTWAIT = int(socket.MSG_DONTWAIT)
_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_POLLIN = select.POLLIN | select.POLLPRI
_POLLOUT = select.POLLOUT
_POLLERR = select.POLLERR | select.POLLHUP | select.POLLNVAL

_ERRNO_PEER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ESHUTDOWN, errno.ENOTCONN)
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _frame_header(size: int) -> bytes:
    if size > _MAX_SHORT:
        return _HEADER.pack(_LONG_MARK) + _LONG_HEADER.pack(size)
    return _HEADER.pack(size)


class _RxState:
    """A frame that is being received (kept across timeouts)."""

    __slots__ = ("header", "header_got", "header_need", "body", "body_got", "size")

    def __init__(self) -> None:
        self.header = bytearray(12)
        self.header_got = 0
        self.header_need = 4
        self.body: Optional[bytearray] = None
        self.body_got = 0
        self.size = -1


class _Direct:
    """A frame received straight into the caller's buffer (recv_frame_into)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class SocketTransport(Transport):
    """One end of a byte stream (socket, SSL socket or pipe fd) carrying stdlib frames."""

    name = "socket"
    capabilities = Capabilities(batch=True, writable_fd=True)  # the descriptor itself: POLLOUT

    def __init__(
        self,
        fd: int = -1,
        *,
        sock: Optional[socket.socket] = None,
        max_message_size: Optional[int] = None,
    ) -> None:
        self._sock = sock
        if sock is not None:
            fd = sock.fileno()
            self._is_ssl = isinstance(sock, ssl.SSLSocket)
            if self._is_ssl:
                sock.setblocking(False)
        else:
            self._is_ssl = False
            if fd < 0:
                raise ValueError("invalid handle")
            try:
                # A socket given as a bare fd (e.g. rebuilt after pickling) is wrapped so
                # that MSG_DONTWAIT and sendmsg work; a pipe end becomes non-blocking.
                self._sock = socket.socket(fileno=fd)
            except OSError:
                os.set_blocking(fd, False)
        self._fd = fd
        # The socket the fast paths use: a plain socket; None for a pipe or TLS.
        self._plain = None if self._is_ssl else self._sock
        self.max_message_size = max_message_size
        self._rx = _RxState()
        # A whole frame read by poll() (TLS only) and not yet handed out.
        self._rx_ready: Optional[bytearray] = None
        self._rx_broken: Optional[BaseException] = None
        # Did the last receive find its data already there? Then try reading before polling.
        self._rx_eager = True
        self._pending: list[memoryview] = []
        self._pending_lock = threading.Lock()
        self._flusher: Optional[threading.Thread] = None
        self._state_lock = threading.Lock()
        # Calls using the descriptor: the Connection lets one thread at a time receive
        # (recv_frame*, poll) and one send, so each marks itself busy with a plain store;
        # flush() and the background flush count in _active, under _state_lock.
        self._rx_busy = False
        self._tx_busy = False
        self._active = 0
        self._closed = False
        self._released = False
        self._wake_fd = -1
        self._pollers: dict = {}
        self._rx_poll: Any = None  # the receive poller's poll(), for the fast path

    @classmethod
    def from_socket(
        cls, sock: socket.socket, *, max_message_size: Optional[int] = None
    ) -> "SocketTransport":
        """Wrap a connected stream socket (plain or ``ssl.SSLSocket``); takes ownership."""
        return cls(sock=sock, max_message_size=max_message_size)

    # -- lifetime and the in-use count ------------------------------------------------
    def _enter(self) -> None:
        with self._state_lock:
            if self._closed:
                raise errors.ConnectionClosedError()
            self._active += 1

    def _leave(self) -> None:
        with self._state_lock:
            self._active -= 1
        if self._closed:
            self._release_if_idle()

    def _leave_rx(self) -> None:
        self._rx_busy = False
        if self._closed:
            self._release_if_idle()

    def _leave_tx(self) -> None:
        self._tx_busy = False
        if self._closed:
            self._release_if_idle()

    def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            wake = self._wake_fd
        if wake >= 0:
            try:
                os.eventfd_write(wake, 1)
            except OSError:
                pass
        self._release_if_idle()

    def _release_if_idle(self) -> None:
        # A call marks itself busy before it checks _closed; close() sets _closed before
        # it checks the marks. Each is one atomic store or load under the GIL, so at least
        # one side sees the other, and whichever comes last releases (once).
        with self._state_lock:
            if self._released or self._active or self._rx_busy or self._tx_busy:
                return
            self._released = True
        self._release()

    def _release(self) -> None:
        # Runs once: after close(), when the last call using the descriptor has left
        # (a background flush of a parked frame included).
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        else:
            try:
                os.close(self._fd)
            except OSError:
                pass
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1
        self._fd = -1
        self._pending = []

    def after_fork_in_child(self) -> None:
        # The wake-up fd and the parked bytes belong to the parent's threads.
        if self._wake_fd >= 0:
            try:
                os.close(self._wake_fd)
            except OSError:
                pass
            self._wake_fd = -1
        self._pollers = {}
        self._rx_poll = None
        self._state_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._rx_busy = False
        self._tx_busy = False
        self._active = 0
        self._pending = []
        self._flusher = None

    def fileno(self) -> int:
        return self._fd

    # -- waiting --------------------------------------------------------------------
    def _wake_descriptor(self) -> int:
        if self._wake_fd < 0:
            with self._state_lock:
                if self._wake_fd < 0:
                    self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return self._wake_fd

    def _poller(self, events: int, closable: bool) -> Any:
        """A poll object for one kind of wait, made once: receiving (one thread at a time,
        under the Connection's receive lock), sending (under ``_pending_lock``), and the
        background flush (which must not be woken by close)."""
        key = (events, closable)
        poller = self._pollers.get(key)
        if poller is None:
            poller = select.poll()
            poller.register(self._fd, events)
            if closable:
                poller.register(self._wake_descriptor(), select.POLLIN)
            self._pollers[key] = poller
        return poller

    def _wait(self, events: int, deadline: Deadline, *, closable: bool = True) -> int:
        """Wait until the fd reports ``events``; returns the events seen, 0 on timeout.

        ``closable=False`` (the background flush) keeps waiting after ``close()``.
        """
        poll = self._poller(events, closable).poll
        fd = self._fd
        while True:
            if closable and self._closed:
                raise errors.ConnectionClosedError()
            ms = poll_ms(deadline)
            ready = poll(ms)
            if closable and self._closed:
                raise errors.ConnectionClosedError()
            for ready_fd, ev in ready:
                if ready_fd == fd:
                    return ev
            if ms == 0 or (deadline is not None and time.monotonic() >= deadline):
                return 0

    # -- raw non-blocking I/O ---------------------------------------------------------
    def _read_some(self, view: memoryview) -> int:
        """Read into ``view`` without blocking: bytes read, 0 at EOF, -1 if none ready."""
        try:
            if self._is_ssl:
                return self._sock.recv_into(view)  # type: ignore[union-attr]
            if self._sock is not None:
                return self._sock.recv_into(view, len(view), _DONTWAIT)
            return os.readv(self._fd, [view])
        except _WOULD_BLOCK:
            return -1
        except ConnectionResetError:
            return 0

    def _write_some(self, views: list[memoryview]) -> int:
        """Write as much of ``views`` as possible without blocking; bytes written (0 if none)."""
        try:
            if self._is_ssl:
                return self._sock.send(views[0])  # type: ignore[union-attr]
            if self._sock is not None:
                if len(views) == 1:
                    return self._sock.send(views[0], _SEND_FLAGS)
                return self._sock.sendmsg(views, (), _SEND_FLAGS)
            return os.writev(self._fd, views)
        except _WOULD_BLOCK:
            return 0
        except OSError as exc:
            _raise_send_error(exc)

    # -- sending --------------------------------------------------------------------
    def _write_views(
        self,
        views: list[memoryview],
        deadline: Deadline,
        *,
        may_park: bool,
        closable: bool = True,
        written: int = 0,
    ) -> None:
        """Write ``views`` completely (consuming the list), or park the rest at the deadline.

        ``written``: bytes of the same frame(s) already written by the caller. Raises
        TimeoutError only if nothing at all was written, or if parking is not allowed.
        """
        while views:
            n = self._write_some([v[:_IO_CHUNK] for v in views[:64]])
            written += n
            while n:
                head = views[0]
                if n >= len(head):
                    n -= len(head)
                    views.pop(0)
                else:
                    views[0] = head[n:]
                    n = 0
            if not views:
                return
            ev = self._wait(_POLLOUT, deadline, closable=closable)
            if ev & (_POLLOUT | _POLLERR):
                continue  # writable, or the next write reports the error (EPIPE)
            if written == 0:
                raise errors.TimeoutError("send timed out before any data was written")
            if not may_park:
                raise errors.TimeoutError(f"send timed out with {written} bytes written")
            # Accept the frame: keep a private copy of what is left and let a thread
            # write it as the peer reads, so the peer never waits on our next call.
            self._pending.extend(memoryview(bytes(v)) for v in views)
            self._start_flusher()
            return

    def _start_flusher(self) -> None:
        with self._state_lock:
            self._active += 1  # the flusher holds the descriptor open until it is done
        self._flusher = threading.Thread(
            target=self._flush_in_background, name="hyperpipe-flush", daemon=True
        )
        self._flusher.start()

    def _flush_in_background(self) -> None:
        try:
            with self._pending_lock:
                try:
                    # Consumed in place, so send_backlog() sees what is left.
                    self._write_views(self._pending, None, may_park=False, closable=False)
                except OSError:
                    # Broken: the next send reports it; the parked bytes are dropped.
                    self._pending = []
        finally:
            self._leave()

    def send_backlog(self) -> int:
        """Bytes of accepted frames not yet written to the descriptor."""
        return sum(len(v) for v in self._pending)

    def _acquire_pending_lock(self, deadline: Deadline) -> None:
        # In slices, so that close() from another thread is noticed (a lock wait cannot be
        # interrupted); only a send behind a parked frame ever waits here.
        lock = self._pending_lock
        if lock.acquire(blocking=False):
            return
        while True:
            if self._closed:
                raise errors.ConnectionClosedError()
            if deadline is None:
                slice_ = 0.05
            else:
                slice_ = min(0.05, deadline - time.monotonic())
                if slice_ <= 0:
                    raise errors.TimeoutError("send timed out behind an earlier message")
            if lock.acquire(timeout=slice_):
                return

    def flush(self, deadline: Deadline) -> None:
        """Wait until every accepted frame is written (TimeoutError at the deadline)."""
        self._enter()
        try:
            self._acquire_pending_lock(deadline)
            self._pending_lock.release()
        finally:
            self._leave()

    def send_object(self, obj: Any, deadline: Deadline) -> None:
        # Pickled completely first (an unpicklable object sends nothing), in-band as the
        # stdlib does.
        self.send_frame(memoryview(dumps(obj)), deadline)

    def send_frame(self, data: memoryview, deadline: Deadline) -> None:
        size = len(data)
        if size > _JOIN_LIMIT:
            self._send_views([memoryview(_frame_header(size)), data], deadline)
            return
        frame = _HEADER.pack(size) + data
        if self._pending or self._is_ssl:
            self._send_views([memoryview(frame)], deadline)
            return
        # The common case, kept short: one write takes the whole frame. Nothing is parked,
        # so no background flush is writing (it empties _pending as its writes complete)
        # and, senders being one at a time, none can start before this frame is written.
        self._tx_busy = True
        try:
            if self._closed:
                raise errors.ConnectionClosedError()
            sock = self._plain
            try:
                if sock is not None:
                    written = sock.send(frame, _SEND_FLAGS)
                else:
                    written = os.write(self._fd, frame)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                _raise_send_error(exc)
            if written < len(frame):
                with self._pending_lock:
                    self._write_views(
                        [memoryview(frame)[written:]],
                        deadline,
                        may_park=deadline is not None,
                        written=written,
                    )
        finally:
            self._tx_busy = False
            if self._closed:
                self._release_if_idle()

    def send_frames(self, frames: list[memoryview], deadline: Deadline) -> None:
        """Send several frames with one write sequence: all are accepted, or none."""
        views: list[memoryview] = []
        for data in frames:
            size = len(data)
            if size <= _JOIN_LIMIT:
                views.append(memoryview(_frame_header(size) + data))
            else:
                views += [memoryview(_frame_header(size)), data]
        self._send_views(views, deadline)

    def _send_views(self, views: list[memoryview], deadline: Deadline) -> None:
        self._tx_busy = True
        try:
            if self._closed:
                raise errors.ConnectionClosedError()
            # Held by the background flush while a parked frame is still being written.
            self._acquire_pending_lock(deadline)
            try:
                if self._pending:
                    # A parked frame whose flushing thread has not taken the lock yet
                    # must go first. If it cannot finish in time, ours is not started.
                    self._write_views(self._pending, deadline, may_park=False)
                self._write_views(views, deadline, may_park=deadline is not None)
            finally:
                self._pending_lock.release()
        finally:
            self._leave_tx()

    # -- receiving ------------------------------------------------------------------
    def _fill(self, view: memoryview, deadline: Deadline, in_frame: bool) -> int:
        """Read into ``view`` until full. Returns bytes read; stops early at the deadline.

        At EOF raises PeerClosedError (nothing of a frame read yet) or ProtocolError.
        """
        got = 0
        need = len(view)
        if not in_frame and not self._rx_eager:
            # The last frame had to be waited for: poll first rather than make a read
            # that fails. If the poll returned at once, read first next time.
            start = time.monotonic()
            if self._wait(_POLLIN, deadline) == 0:
                return 0
            self._rx_eager = time.monotonic() - start < 20e-6
        while got < need:
            n = self._read_some(view[got:])
            if n > 0:
                got += n
                continue
            if n == 0:
                if in_frame or got:
                    raise errors.ProtocolError("got end of file during message")
                raise errors.PeerClosedError()
            if not in_frame:
                self._rx_eager = False
            if self._wait(_POLLIN, deadline) == 0:
                return got
        return got

    def _receive(
        self, maxlength: Optional[int], deadline: Deadline, into: Optional[tuple] = None
    ) -> Any:
        """Advance the frame state machine; returns the body, or None at the deadline.

        ``into=(buf, offset)``: a big frame that fits is read straight into ``buf`` and
        ``_Direct(size)`` is returned instead of a body.
        """
        if self._rx_broken is not None:
            raise self._rx_broken
        ready = self._rx_ready
        if ready is not None:
            self._rx_ready = None
            if maxlength is not None and len(ready) > maxlength:
                self._rx_broken = errors.MessageTooLongError()
                raise errors.MessageTooLongError()
            return ready
        rx = self._rx
        while rx.size < 0:
            if rx.header_got < rx.header_need:
                hv = memoryview(rx.header)[rx.header_got : rx.header_need]
                rx.header_got += self._fill(hv, deadline, rx.header_got > 0)
                if rx.header_got < rx.header_need:
                    return None
            if rx.header_need == 4:
                (size,) = _HEADER.unpack_from(rx.header, 0)
                if size == _LONG_MARK:
                    rx.header_need = 12
                    continue
                if size < 0:
                    self._break_rx(errors.ProtocolError(f"corrupt frame header (length {size})"))
                rx.size = size
            else:
                (rx.size,) = _LONG_HEADER.unpack_from(rx.header, 4)
        size = rx.size
        if rx.body is None:
            if maxlength is not None and size > maxlength:
                # As the stdlib: the body is not read; the caller stops reading.
                self._rx_broken = errors.MessageTooLongError()
                raise errors.MessageTooLongError()
            limit = self.max_message_size
            if limit is not None and size > limit:
                self._break_rx(
                    errors.MessageTooLongError(
                        f"message of {size} bytes exceeds max_message_size={limit}"
                    )
                )
            if into is not None and size > _SMALL_FRAME and into[1] + size <= len(into[0]):
                buf, offset = into
                target = buf[offset : offset + size]
                got = self._fill(target, deadline, True)
                if got < size:
                    # Keep what arrived in our own buffer: any later call finishes the frame.
                    rx.body = bytearray(max(got, min(size, _EAGER_ALLOC)))
                    rx.body[:got] = target[:got]
                    rx.body_got = got
                    return None
                self._rx = _RxState()
                return _Direct(size)
            if size <= _SMALL_FRAME and self._sock is not None and not self._is_ssl:
                # Usually the whole body is already there: one recv() into a bytes object.
                try:
                    data = self._sock.recv(size, _DONTWAIT)
                except BlockingIOError:
                    data = b""
                except ConnectionResetError:
                    raise errors.ProtocolError("got end of file during message") from None
                if len(data) == size:
                    self._rx = _RxState()
                    return data
                rx.body = bytearray(size)
                rx.body[: len(data)] = data
                rx.body_got = len(data)
            else:
                rx.body = bytearray(min(size, _EAGER_ALLOC))
        body = rx.body
        while rx.body_got < size:
            if rx.body_got == len(body):
                # Commit more memory only as the data arrives (doubling, capped at size).
                body.extend(bytes(min(len(body), size - len(body))))
            want = len(body) - rx.body_got
            got = self._fill(memoryview(body)[rx.body_got :], deadline, True)
            rx.body_got += got
            if got < want:
                return None
        self._rx = _RxState()
        return body

    def _receive_new(
        self, maxlength: Optional[int], deadline: Deadline, into: Optional[tuple] = None
    ) -> Any:
        """``_receive`` when no frame is under way on a plain socket or a pipe: the header,
        then a small body, each with one read; state is only kept if a read falls short."""
        if not self._rx_eager:
            # As in _fill: the last frame had to be waited for, so poll before reading.
            start = time.monotonic()
            if deadline is None:
                poll = self._rx_poll
                if poll is None:
                    poll = self._rx_poll = self._poller(_POLLIN, True).poll
                # _wait's loop, shortened: with no deadline poll() returns only when the
                # descriptor is ready or close() wrote the wake-up descriptor.
                if self._closed:
                    raise errors.ConnectionClosedError()
                poll(-1)
                if self._closed:
                    raise errors.ConnectionClosedError()
            elif self._wait(_POLLIN, deadline) == 0:
                return None
            self._rx_eager = time.monotonic() - start < 20e-6
        sock = self._plain
        try:
            head = sock.recv(4, _DONTWAIT) if sock is not None else os.read(self._fd, 4)
        except BlockingIOError:
            self._rx_eager = False
            return self._receive(maxlength, deadline, into)
        except ConnectionResetError:
            head = b""
        rx = self._rx
        got = len(head)
        if got < 4:
            if not got:
                raise errors.PeerClosedError()
            rx.header[:got] = head
            rx.header_got = got
            return self._receive(maxlength, deadline, into)
        (size,) = _HEADER.unpack(head)
        limit = self.max_message_size
        if (
            not 0 <= size <= _SMALL_FRAME
            or (maxlength is not None and size > maxlength)
            or (limit is not None and size > limit)
        ):
            rx.header[:4] = head
            rx.header_got = 4
            return self._receive(maxlength, deadline, into)
        # The sender wrote header and small body with one call: the body is usually here.
        try:
            data = sock.recv(size, _DONTWAIT) if sock is not None else os.read(self._fd, size)
        except BlockingIOError:
            data = b""
        except ConnectionResetError:
            raise errors.ProtocolError("got end of file during message") from None
        got = len(data)
        if got == size:
            return data
        rx.header[:4] = head
        rx.header_got = 4
        rx.size = size
        rx.body = bytearray(size)
        rx.body[:got] = data
        rx.body_got = got
        return self._receive(maxlength, deadline, into)

    def recv_frame_into(self, buf: memoryview, offset: int, deadline: Deadline) -> int:
        self._rx_busy = True
        try:
            if self._closed:
                raise errors.ConnectionClosedError()
            if self._rx.header_got or self._is_ssl or self._rx_broken or self._rx_ready is not None:
                body = self._receive(None, deadline, (buf, offset))
            else:
                body = self._receive_new(None, deadline, (buf, offset))
        finally:
            self._leave_rx()
        if body is None:
            raise errors.TimeoutError("recv timed out")
        if type(body) is _Direct:
            return body.size
        size = len(body)
        if offset + size > len(buf):
            raise errors.BufferTooShort(bytes(body))
        buf[offset : offset + size] = body
        return size

    def _break_rx(self, exc: BaseException) -> None:
        self._rx_broken = exc
        raise exc

    def recv_frame(self, maxlength: Optional[int], deadline: Deadline) -> Any:
        self._rx_busy = True
        try:
            if self._closed:
                raise errors.ConnectionClosedError()
            if self._rx.header_got or self._is_ssl or self._rx_broken or self._rx_ready is not None:
                body = self._receive(maxlength, deadline)
            else:
                body = self._receive_new(maxlength, deadline)
        finally:
            self._rx_busy = False  # _leave_rx(), inlined on this hot path
            if self._closed:
                self._release_if_idle()
        if body is None:
            raise errors.TimeoutError("recv timed out")
        return body

    def poll(self, deadline: Deadline) -> bool:
        self._rx_busy = True
        try:
            if self._closed:
                raise errors.ConnectionClosedError()
            if self._rx_broken is not None or self._rx_ready is not None:
                return True
            if not self._is_ssl:
                return bool(self._wait(_POLLIN, deadline))
            # TLS: readable bytes may be protocol records (e.g. session tickets) and not a
            # message, so read what is there and answer for a whole frame.
            while True:
                try:
                    body = self._receive(None, time.monotonic())
                except (EOFError, OSError) as exc:
                    if isinstance(exc, errors.ConnectionClosedError):
                        raise
                    self._rx_broken = exc
                    return True
                if body is not None:
                    self._rx_ready = body
                    return True
                if self._sock.pending():  # type: ignore[union-attr]
                    continue
                if not self._wait(_POLLIN, deadline):
                    return False
        finally:
            self._leave_rx()

    # -- pickling ---------------------------------------------------------------------
    def reduce(self) -> tuple:
        from multiprocessing import reduction

        if self._is_ssl:
            raise TypeError("a TLS connection cannot be sent to another process")
        return _rebuild_socket_transport, (reduction.DupFd(self._fd), self.max_message_size)

    def statistics(self) -> dict:
        return {"transport": self.name, "send_backlog": self.send_backlog()}


def _raise_send_error(exc: OSError) -> NoReturn:
    if exc.errno in _ERRNO_PEER_GONE:
        raise errors.BrokenPipeError(exc.errno, os.strerror(exc.errno)) from None
    raise exc


def _rebuild_socket_transport(dupfd: Any, max_message_size: Optional[int]) -> SocketTransport:
    return SocketTransport(dupfd.detach(), max_message_size=max_message_size)


def socket_pipe(duplex: bool = True) -> tuple[SocketTransport, SocketTransport]:
    """Two connected ends: a socketpair (duplex) or an ``os.pipe`` (reader, writer)."""
    if duplex:
        s1, s2 = socket.socketpair()
        return SocketTransport(sock=s1), SocketTransport(sock=s2)
    r, w = os.pipe()
    return SocketTransport(r), SocketTransport(w)
