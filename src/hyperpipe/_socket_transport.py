"""The socket transport: frames over a stream socket or a pipe, in the standard library's format.

Wire format (identical to ``multiprocessing.connection.Connection`` on POSIX): a 4-byte
big-endian signed length ``!i``, or ``-1`` followed by an 8-byte ``!Q`` length when the
message is longer than 2**31 - 1 bytes; then the payload.

Unlike the standard library, every wait goes through ``poll()`` with a deadline and a
wake-up descriptor, so that

- a receive that times out keeps the part of the frame that arrived (``_RxState``) and the
  next call continues it;
- a send that times out before its first byte leaves nothing in the stream; once a frame
  has started, what could not be written by the deadline is kept in ``_pending`` and is
  written before the next frame, while a receive waits, or at close: the frame is accepted,
  as if the kernel buffer were larger, and is never cut in half;
- ``close()`` from another thread wakes blocked calls (they raise ``ConnectionClosedError``),
  and the descriptor is only closed once no call is using it (no fd-reuse race).

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
from typing import Any, Optional

from . import errors
from ._transport import Deadline, Transport

_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")
_LONG_MARK = -1
_MAX_SHORT = 0x7FFFFFFF
# Below this size the header and payload are joined and written with one call.
_JOIN_LIMIT = 16384
# Largest single read/write call (keeps memoryview slices and syscalls bounded).
_IO_CHUNK = 1 << 30

_POLLIN = select.POLLIN | select.POLLPRI
_POLLERR = select.POLLERR | select.POLLHUP | select.POLLNVAL

_ERRNO_PEER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ESHUTDOWN, errno.ENOTCONN)


def _frame_header(size: int) -> bytes:
    if size > _MAX_SHORT:
        return _HEADER.pack(_LONG_MARK) + _LONG_HEADER.pack(size)
    return _HEADER.pack(size)


def _remaining(deadline: Deadline) -> Optional[float]:
    if deadline is None:
        return None
    return deadline - time.monotonic()


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

    @property
    def started(self) -> bool:
        return self.header_got > 0


class SocketTransport(Transport):
    """One end of a byte stream (socket, SSL socket or pipe fd) carrying stdlib frames."""

    name = "socket"

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
        self.max_message_size = max_message_size
        self._rx = _RxState()
        self._pending: list[memoryview] = []
        self._pending_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._active = 0
        self._closed = False
        self._wake_fd = -1
        self._rx_broken: Optional[BaseException] = None

    # -- construction helpers -------------------------------------------------------
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
            release = self._closed and self._active == 0
        if release:
            self._release()

    def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            busy = self._active > 0
            wake = self._wake_fd
        if wake >= 0:
            try:
                os.eventfd_write(wake, 1)
            except OSError:
                pass
        if not busy:
            self._release()

    def _release(self) -> None:
        # Best effort: a frame that was accepted but not yet written goes out now if the
        # peer has room; otherwise it is lost with the connection, like unread kernel data
        # of a process that exits.
        if self._pending and not self._is_ssl:
            try:
                self._flush_pending(time.monotonic(), raise_timeout=False)
            except OSError:
                pass
        self._pending = []
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

    def after_fork_in_child(self) -> None:
        # The wake-up fd belongs to the parent's threads.
        if self._wake_fd >= 0:
            try:
                os.close(self._wake_fd)
            except OSError:
                pass
            self._wake_fd = -1
        self._state_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._active = 0
        # Parked bytes are the parent's flushing thread's to write, not ours.
        self._pending = []

    def fileno(self) -> int:
        return self._fd

    # -- waiting --------------------------------------------------------------------
    def _wake_descriptor(self) -> int:
        if self._wake_fd < 0:
            with self._state_lock:
                if self._wake_fd < 0:
                    self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return self._wake_fd

    def _wait(self, events: int, deadline: Deadline) -> int:
        """Wait until the fd reports ``events``; returns the events seen, 0 on timeout."""
        poller = select.poll()
        poller.register(self._fd, events)
        poller.register(self._wake_descriptor(), select.POLLIN)
        while True:
            if self._closed:
                raise errors.ConnectionClosedError()
            remaining = _remaining(deadline)
            if remaining is None:
                ms = -1
            elif remaining <= 0:
                ms = 0
            else:
                ms = max(1, int(remaining * 1000 + 0.999))
            ready = poller.poll(ms)
            if self._closed:
                raise errors.ConnectionClosedError()
            for fd, ev in ready:
                if fd == self._fd:
                    return ev
            if ms == 0 or (remaining is not None and time.monotonic() >= deadline):  # type: ignore[operator]
                return 0

    # -- raw non-blocking I/O ---------------------------------------------------------
    def _read_some(self, view: memoryview) -> int:
        """Read into ``view`` without blocking: bytes read, 0 at EOF, -1 if none ready."""
        try:
            if self._is_ssl:
                return self._sock.recv_into(view)  # type: ignore[union-attr]
            if self._sock is not None:
                return self._sock.recv_into(view, len(view), socket.MSG_DONTWAIT)
            return os.readv(self._fd, [view])
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
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
                    return self._sock.send(views[0], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                return self._sock.sendmsg(views, (), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            return os.writev(self._fd, views)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return 0
        except OSError as exc:
            if exc.errno in _ERRNO_PEER_GONE:
                raise errors.BrokenPipeError(exc.errno, os.strerror(exc.errno)) from None
            raise

    # -- sending --------------------------------------------------------------------
    def _write_views(
        self, views: list[memoryview], deadline: Deadline, *, may_pend: bool
    ) -> None:
        """Write ``views`` completely, or (``may_pend``) park the rest when the deadline passes.

        Raises TimeoutError only if nothing at all was written.
        """
        total = sum(len(v) for v in views)
        written = 0
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
            ev = self._wait(select.POLLOUT, deadline)
            if ev & select.POLLOUT:
                continue
            if ev & _POLLERR:
                # Let the next write report the error (EPIPE -> BrokenPipeError).
                if self._write_some([views[0][:1]]) == 0:
                    raise errors.BrokenPipeError()
                written += 1
                views[0] = views[0][1:]
                if not len(views[0]):
                    views.pop(0)
                continue
            # Timed out.
            if written == 0:
                raise errors.TimeoutError("send timed out before any data was written")
            if not may_pend:
                raise errors.TimeoutError(
                    f"send timed out after {written} of {total} bytes"
                )
            # Accept the frame: keep a private copy of what is left and let a thread
            # write it as the peer reads, so the peer never waits on our next call.
            self._pending.extend(memoryview(bytes(v)) for v in views)
            threading.Thread(
                target=self._flush_in_background, name="hyperpipe-flush", daemon=True
            ).start()
            return

    def _flush_pending(self, deadline: Deadline, *, raise_timeout: bool = True) -> bool:
        """Write parked bytes; True when none are left."""
        with self._pending_lock:
            try:
                self._flush_pending_locked(deadline)
            except errors.TimeoutError:
                if raise_timeout:
                    raise
                return False
            return True

    def _flush_pending_locked(self, deadline: Deadline) -> None:
        if not self._pending:
            return
        views = self._pending
        self._pending = []
        try:
            self._write_views(views, deadline, may_pend=False)
        except errors.TimeoutError as exc:
            # Partly written views were advanced in place; keep what is left.
            self._pending = views
            raise errors.TimeoutError("send timed out behind an earlier message") from exc
        except BaseException:
            self._pending = views
            raise

    def _flush_in_background(self) -> None:
        try:
            self._enter()
        except errors.ConnectionClosedError:
            return
        try:
            self._flush_pending(None)
        except OSError:
            # Closed or broken: the next send reports it; the parked bytes are dropped.
            self._pending = []
        finally:
            self._leave()

    def send_frame(self, data: memoryview, deadline: Deadline) -> None:
        self._enter()
        try:
            size = len(data)
            header = _frame_header(size)
            if size <= _JOIN_LIMIT:
                views = [memoryview(header + bytes(data))]
            else:
                views = [memoryview(header), data]
            # The lock is held by the flushing thread while a parked frame is written.
            if deadline is None:
                self._pending_lock.acquire()
            elif not self._pending_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise errors.TimeoutError("send timed out behind an earlier message")
            try:
                if self._pending:
                    self._flush_pending_locked(deadline)
                self._write_views(views, deadline, may_pend=deadline is not None)
            finally:
                self._pending_lock.release()
        finally:
            self._leave()

    # -- receiving ------------------------------------------------------------------
    def _fill(self, view: memoryview, deadline: Deadline, in_frame: bool) -> int:
        """Read into ``view`` until full. Returns bytes read; stops early at deadline or EOF.

        At EOF raises PeerClosedError (nothing of a frame read yet) or ProtocolError.
        """
        got = 0
        need = len(view)
        while got < need:
            n = self._read_some(view[got:])
            if n > 0:
                got += n
                continue
            if n == 0:
                if in_frame or got:
                    raise errors.ProtocolError("got end of file during message")
                raise errors.PeerClosedError()
            ev = self._wait(_POLLIN, deadline)
            if ev == 0:
                return got
        return got

    def _receive(self, maxlength: Optional[int], deadline: Deadline) -> Any:
        """Advance the frame state machine; returns the body or None on timeout."""
        if self._rx_broken is not None:
            raise self._rx_broken
        rx = self._rx
        hv = memoryview(rx.header)
        while rx.header_got < rx.header_need:
            n = self._fill(hv[rx.header_got : rx.header_need], deadline, rx.started)
            rx.header_got += n
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
            if self.max_message_size is not None and size > self.max_message_size:
                self._break_rx(
                    errors.MessageTooLongError(
                        f"message of {size} bytes exceeds max_message_size={self.max_message_size}"
                    )
                )
            try:
                rx.body = bytearray(size)
            except (MemoryError, OverflowError):
                self._break_rx(
                    errors.MessageTooLongError(f"message of {size} bytes cannot be allocated")
                )
        body = rx.body
        assert body is not None
        if rx.body_got < size:
            rx.body_got += self._fill(memoryview(body)[rx.body_got :], deadline, True)
            if rx.body_got < size:
                return None
        self._rx = _RxState()
        return body

    def _break_rx(self, exc: BaseException) -> None:
        self._rx_broken = exc
        raise exc

    def recv_frame(self, maxlength: Optional[int], deadline: Deadline) -> Any:
        self._enter()
        try:
            body = self._receive(maxlength, deadline)
        finally:
            self._leave()
        if body is None:
            raise errors.TimeoutError("recv timed out")
        return body

    def poll(self, timeout: Optional[float]) -> bool:
        self._enter()
        try:
            if self._rx_broken is not None:
                return True
            if self._is_ssl and self._sock.pending():  # type: ignore[union-attr]
                return True
            deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
            return bool(self._wait(_POLLIN, deadline))
        finally:
            self._leave()

    # -- pickling ---------------------------------------------------------------------
    def reduce(self) -> tuple:
        from multiprocessing import reduction

        if self._is_ssl:
            raise TypeError("a TLS connection cannot be sent to another process")
        return _rebuild_socket_transport, (reduction.DupFd(self._fd), self.max_message_size)

    def statistics(self) -> dict:
        return {"transport": self.name, "pending_bytes": sum(len(v) for v in self._pending)}


def _rebuild_socket_transport(dupfd: Any, max_message_size: Optional[int]) -> SocketTransport:
    return SocketTransport(dupfd.detach(), max_message_size=max_message_size)


def socket_pipe(duplex: bool = True) -> tuple[SocketTransport, SocketTransport]:
    """Two connected ends: a socketpair (duplex) or an ``os.pipe`` (reader, writer)."""
    if duplex:
        s1, s2 = socket.socketpair()
        return SocketTransport(sock=s1), SocketTransport(sock=s2)
    r, w = os.pipe()
    return SocketTransport(r), SocketTransport(w)
