"""The socket transport: frames over a stream socket or a pipe, in the standard library's format.

The frames are those of ``multiprocessing.connection`` (``_framing`` builds and parses
them), plus hyperpipe's out-of-band frame, sent only to a peer known to read it: the other
end of ``Pipe(transport="socket")``, or a Listener/Client peer that announced it in the
authkey handshake (docs/wire.md). Frames are read exactly (no read-ahead), so several
processes may share one end under a lock as with the stdlib, and
``send_handle``/``recv_handle`` can use the descriptor between frames.

Waiting:

- a receive with no timeout on a plain socket blocks in ``read()`` itself, as the stdlib
  does (no ``poll`` first); ``close()`` from another thread wakes it by shutting the socket
  down for reading (so other processes holding the same end see it closed too);
- every other wait (a timeout, a pipe end, TLS, a send that cannot complete at once) is a
  ``poll()`` with a deadline and a wake-up descriptor that ``close()`` writes to.

Guarantees:

- a receive that times out keeps the part of the frame that arrived; the next call
  continues it;
- a send that times out before its first byte leaves nothing in the stream; once a frame
  has started, what could not be written by the deadline is parked and written by a
  background thread as the peer reads: the frame is accepted, as if the kernel buffer were
  larger, and is never cut in half (``send_backlog()``/``flush()`` expose it);
- ``close()`` while a frame is being sent lets that frame finish (at most
  ``CLOSE_SEND_BOUND`` seconds) before the descriptor closes, so the peer gets whole
  messages, then ``EOFError``;
- the descriptor is only closed once no call is using it (no fd-reuse race);
- the peer's stream ending inside a frame raises ``TruncatedMessageError`` (an ``EOFError``
  and an ``OSError``); a peer resetting the connection counts as end of stream.

The descriptor stays in blocking mode for sockets (``MSG_DONTWAIT`` per non-blocking call)
because ``multiprocessing.reduction.send_handle``/``recv_handle`` use it directly, and it
never has a timeout (``socket.setdefaulttimeout()`` does not apply, as in the stdlib); pipe
ends are switched to non-blocking mode (they cannot carry handles).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import pickle
import select
import socket
import ssl
import threading
import time
from typing import Any, NoReturn, Optional

from . import _framing, errors
from ._framing import HEADER as _HEADER
from ._framing import Direct, FrameReader, OobFrame
from ._transport import Capabilities, Deadline, Transport, poll_ms

try:
    from . import _core
except ImportError:  # no compiler at install: the Python path does every call
    _core = None  # type: ignore[assignment]

#: False: no C fast path for new connections (tests of the pure-Python path).
C_FAST_PATH = True

#: Microseconds a receive with no deadline spins (non-waiting reads, the CPU yielded
#: between them) before it blocks in ``read``, on a ``Pipe(transport="socket")`` end and on
#: a Listener/Client connection whose peer is on this host (AF_UNIX, or TCP to a loopback
#: address); the window adapts as the shared-memory receiver's (``sf_adapt_spin`` in
#: _core.c). ``Pipe(transport="socket", spin_us=0)`` turns it off. A TCP peer on another
#: host gets no spin: its replies come too late to be caught.
SPIN_US = 50

#: Seconds ``close()`` lets a frame that is being sent finish before closing anyway.
CLOSE_SEND_BOUND = 2.0
# Largest single read/write call (keeps memoryview slices and syscalls bounded).
_IO_CHUNK = 1 << 30
# Frames up to this size are read with recv() into a bytes object directly.
_SMALL_FRAME = 65536
_JOIN_LIMIT = _framing.JOIN_LIMIT

_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack
_DONTWAIT = int(socket.MSG_DONTWAIT)
_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_POLLIN = select.POLLIN | select.POLLPRI
_POLLOUT = select.POLLOUT
_POLLERR = select.POLLERR | select.POLLHUP | select.POLLNVAL

_ERRNO_PEER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ESHUTDOWN, errno.ENOTCONN)
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
# _wait(): close() woke the call.
_CLOSED = -1
# close(): how long a call woken by the eventfd may take to leave before it is taken to be
# blocked in the kernel (recv/send with no deadline) and the socket is shut down.
_WAKE_GRACE = 0.05
_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_CUT = (
    f"closed while sending: the peer read nothing for {CLOSE_SEND_BOUND} s, "
    "so the message was cut"
)


class SocketTransport(Transport):
    """One end of a byte stream (socket, SSL socket or pipe fd) carrying stdlib frames.

    ``oob=True``: the peer reads out-of-band frames, so big buffers in sent objects go
    as their own parts of the frame instead of being copied into the pickle stream.
    Out-of-band frames are always accepted on receive (no stdlib peer sends one).
    """

    name = "socket"
    capabilities = Capabilities(batch=True, writable_fd=True)  # the descriptor itself: POLLOUT

    def __init__(
        self,
        fd: int = -1,
        *,
        sock: Optional[socket.socket] = None,
        max_message_size: Optional[int] = None,
        oob: bool = False,
        spin_us: int = 0,
    ) -> None:
        _check_spin_us(spin_us)
        # How long the C fast path's receive spins before it blocks (SPIN_US).
        self._spin_us = int(spin_us)
        self._sock = sock
        if sock is not None:
            fd = sock.fileno()
            self._is_ssl = isinstance(sock, ssl.SSLSocket)
            if self._is_ssl:
                sock.setblocking(False)
            else:
                sock.settimeout(None)  # not socket.getdefaulttimeout(): blocking, as the stdlib
        else:
            self._is_ssl = False
            if fd < 0:
                raise ValueError("invalid handle")
            try:
                # A socket given as a bare fd (e.g. rebuilt after pickling) is wrapped so
                # that MSG_DONTWAIT and sendmsg work; a pipe end becomes non-blocking.
                self._sock = socket.socket(fileno=fd)
                self._sock.settimeout(None)
            except OSError:
                os.set_blocking(fd, False)
        self._fd = fd
        # The socket the fast paths use: a plain socket; None for a pipe or TLS.
        self._plain = None if self._is_ssl else self._sock
        # Receives may take _receive_new's short path (a TLS frame can come from poll()).
        self._rx_plain = not self._is_ssl
        self.max_message_size = max_message_size
        # Frames _receive_new reads whole with one call (bigger ones go to the FrameReader).
        self._small_limit = (
            _SMALL_FRAME if max_message_size is None else min(_SMALL_FRAME, max_message_size)
        )
        self._oob = oob
        self._reader = FrameReader(max_message_size)
        # A whole frame read by poll() (TLS only) and not yet handed out.
        self._rx_ready: Any = None
        self._rx_broken: Optional[BaseException] = None
        self._pending: list[memoryview] = []
        self._pending_lock = threading.Lock()
        self._flusher: Optional[threading.Thread] = None
        self._init_state()

    def _init_state(self) -> None:
        # The descriptor is only closed once no call is using it (no fd-reuse race). The
        # Connection lets one thread at a time receive and one send; each holds its
        # direction's gate while it uses the descriptor, and close() takes both gates
        # before it closes it. flush() and the background flush count in _active, under
        # _state_lock. Locks throughout: nothing relies on the GIL.
        self._state_lock = threading.Lock()
        self._rx_gate = threading.Lock()
        self._tx_gate = threading.Lock()
        self._active = 0
        self._closed = False
        self._close_by = 0.0
        self._released = False
        self._wake_fd = -1
        self._pollers: dict = {}

    @classmethod
    def from_socket(
        cls, sock: socket.socket, *, max_message_size: Optional[int] = None, oob: bool = False
    ) -> "SocketTransport":
        """Wrap a connected stream socket (plain or ``ssl.SSLSocket``); takes ownership.

        Its receives spin (``SPIN_US``) when the peer is on this host."""
        spin_us = SPIN_US if _peer_on_this_host(sock) else 0
        return cls(sock=sock, max_message_size=max_message_size, oob=oob, spin_us=spin_us)

    @property
    def oob(self) -> bool:
        """Whether sent objects may use out-of-band frames (the peer reads them)."""
        return self._oob

    # -- lifetime and the in-use marks --------------------------------------------------
    def _enter(self) -> None:
        with self._state_lock:
            if self._closed:
                raise errors.ConnectionClosedError()
            self._active += 1

    def _leave(self) -> None:
        with self._state_lock:
            self._active -= 1
            if not self._closed:
                return
        self._release_if_idle()

    # Every call: a gate and a flag, one acquire and one release.
    def _enter_rx(self) -> None:
        self._rx_gate.acquire()
        if self._closed:
            # A close() that found the gate held (by us, just now) left the release to us.
            self._leave_rx()
            raise errors.ConnectionClosedError()

    def _leave_rx(self) -> None:
        self._rx_gate.release()
        if self._closed:
            self._release_if_idle()

    def _enter_tx(self) -> None:
        self._tx_gate.acquire()
        if self._closed:
            # A close() that found the gate held (by us, just now) left the release to us.
            self._leave_tx()
            raise errors.ConnectionClosedError()

    def _leave_tx(self) -> None:
        self._tx_gate.release()
        if self._closed:
            self._release_if_idle()

    def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._close_by = time.monotonic() + CLOSE_SEND_BOUND
            wake = self._wake_fd
        if wake >= 0:
            try:
                os.eventfd_write(wake, 1)
            except OSError:
                pass
        # A receive waiting in poll() leaves at once; one still inside after a moment is
        # blocked in recv() itself, which only a shutdown wakes.
        self._wait_for_call(self._rx_gate, _WAKE_GRACE, socket.SHUT_RD)
        # A frame being sent is finished first (bounded): the peer never sees half of it.
        # Past the bound a write blocked in the kernel is ended by a shutdown. (A close()
        # from a signal handler interrupting that very send waits out the bound.)
        self._wait_for_call(self._tx_gate, CLOSE_SEND_BOUND, socket.SHUT_WR)
        # Whichever comes last of close() and the calls still inside closes the fd.
        self._release_if_idle()

    def _wait_for_call(self, gate: Any, patience: float, shutdown: int) -> None:
        """Wait until the call holding ``gate`` has left; past ``patience`` it is blocked
        in the kernel: shut that direction down, and give it the bound to leave."""
        if not gate.acquire(timeout=patience):
            self._shutdown(shutdown)
            if not gate.acquire(timeout=CLOSE_SEND_BOUND):
                return  # still inside: it closes the descriptor when it leaves
        gate.release()

    def _shutdown(self, how: int) -> None:
        if self._plain is not None:
            try:
                self._plain.shutdown(how)
            except OSError:
                pass

    def _release_if_idle(self) -> None:
        if not self._rx_gate.acquire(False):
            return  # a receive is inside: it comes here on leaving
        try:
            if not self._tx_gate.acquire(False):
                return  # likewise a send
            try:
                with self._state_lock:
                    if self._released or self._active:
                        return
                    self._released = True
                self._release()
            finally:
                self._tx_gate.release()
        finally:
            self._rx_gate.release()

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
        closed, released = self._closed, self._released
        self._init_state()
        self._closed, self._released = closed, released
        self._pending_lock = threading.Lock()
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
        """A poll object for one kind of wait, made once: receiving (one thread at a time),
        sending (under ``_pending_lock``), and waits close() must not wake (the background
        flush, a frame finishing after close)."""
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
        """Wait until the fd reports ``events``: the events seen, 0 at the deadline, or
        ``_CLOSED`` once ``close()`` was called (``closable=False``: keep waiting)."""
        poll = self._poller(events, closable).poll
        fd = self._fd
        while True:
            if closable and self._closed:
                return _CLOSED
            ms = poll_ms(deadline)
            ready = poll(ms)
            if closable and self._closed:
                return _CLOSED
            for ready_fd, ev in ready:
                if ready_fd == fd:
                    return ev
            if ms == 0 or (deadline is not None and time.monotonic() >= deadline):
                return 0

    # -- raw I/O --------------------------------------------------------------------
    def _read_some(self, view: memoryview, blocking: bool) -> int:
        """Read into ``view``: bytes read, 0 at end of stream, -1 if none ready
        (``blocking``: wait in the read itself; only for a plain socket)."""
        try:
            if blocking:
                return self._sock.recv_into(view)  # type: ignore[union-attr]
            if self._is_ssl:
                return self._sock.recv_into(view)  # type: ignore[union-attr]
            if self._sock is not None:
                return self._sock.recv_into(view, len(view), _DONTWAIT)
            return os.readv(self._fd, [view])
        except _WOULD_BLOCK:
            return -1
        except ConnectionResetError:
            return 0

    def _write_some(self, views: list[memoryview], blocking: bool = False) -> int:
        """Write as much of ``views`` as possible; bytes written (0 if none could be).

        ``blocking`` (a plain socket only): wait in the write itself until all is written.
        """
        flags = _NOSIGNAL if blocking else _SEND_FLAGS
        try:
            if self._is_ssl:
                return self._sock.send(views[0])  # type: ignore[union-attr]
            if self._sock is not None:
                if len(views) == 1:
                    return self._sock.send(views[0], flags)
                return self._sock.sendmsg(views, (), flags)
            return os.writev(self._fd, views)
        except _WOULD_BLOCK:
            return 0
        except OSError as exc:
            if self._closed:  # close() gave up on the frame after CLOSE_SEND_BOUND
                raise errors.ConnectionClosedError(_CUT) from None
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
        ``close()`` stops a write that has not started; one that has gets until
        ``CLOSE_SEND_BOUND`` after the close to finish. With no deadline on a plain socket
        the writes block, as the stdlib's do (close() shuts a write still blocked at the
        bound down).
        """
        blocking = deadline is None and closable and self._plain is not None
        while views:
            n = n_written = self._write_some([v[:_IO_CHUNK] for v in views[:64]], blocking)
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
            if blocking and n_written:
                continue  # a signal cut the write short (nothing at all: the fd is
                # non-blocking after all, e.g. set so by another process: poll)
            ev = self._wait(_POLLOUT, deadline, closable=closable)
            if ev == _CLOSED:
                if not written:
                    raise errors.ConnectionClosedError()
                closable = False  # finish this frame, within the bound
                deadline = self._close_by if deadline is None else min(deadline, self._close_by)
                continue
            if ev & (_POLLOUT | _POLLERR):
                continue  # writable, or the next write reports the error (EPIPE)
            if self._closed and not closable and time.monotonic() >= self._close_by:
                raise errors.ConnectionClosedError(_CUT)
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
        # stdlib does unless the peer reads out-of-band frames.
        if self._oob:
            stream, buffers = _framing.dumps_oob(obj)
            if buffers:
                self._send_views(_framing.oob_views(stream, buffers), deadline)
                return
            self.send_frame(stream, deadline)
            return
        self.send_frame(_framing.dumps(obj), deadline)

    def send_frame(self, data: memoryview, deadline: Deadline) -> None:
        size = len(data)
        if size > _JOIN_LIMIT:
            self._send_views([memoryview(_framing.header(size)), data], deadline)
            return
        frame = _pack_header(size) + data
        if self._pending or self._is_ssl:
            self._send_views([memoryview(frame)], deadline)
            return
        # The common case, kept short: one write takes the whole frame. Nothing is parked,
        # so no background flush is writing (it empties _pending as its writes complete)
        # and, senders being one at a time, none can start before this frame is written.
        sock = self._plain
        blocking = deadline is None and sock is not None
        # _enter_tx()/_leave_tx() written out: this is every small send's path.
        gate = self._tx_gate
        gate.acquire()
        try:
            if self._closed:
                raise errors.ConnectionClosedError()
            try:
                if sock is not None:
                    written = sock.send(frame, _NOSIGNAL if blocking else _SEND_FLAGS)
                else:
                    written = os.write(self._fd, frame)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                if self._closed:
                    raise errors.ConnectionClosedError(_CUT) from None
                _raise_send_error(exc)
            if written < len(frame):
                self._send_rest(frame, written, deadline)
        finally:
            gate.release()
            if self._closed:
                self._release_if_idle()

    def _send_rest(self, frame: bytes, written: int, deadline: Deadline = None) -> None:
        """Write the rest of a small frame whose first ``written`` bytes one write took
        (0: it was refused, and is tried again to report why). Under the send gate; also
        the C fast path's way out (``_core.SocketFast``)."""
        with self._pending_lock:
            self._write_views(
                [memoryview(frame)[written:]],
                deadline,
                may_park=deadline is not None,
                written=written,
            )

    def send_frames(self, frames: list[memoryview], deadline: Deadline) -> None:
        """Send several frames with one write sequence: all are accepted, or none."""
        views: list[memoryview] = []
        for data in frames:
            views += _framing.frame_views(data)
        self._send_views(views, deadline)

    def _send_views(self, views: list, deadline: Deadline) -> None:
        self._enter_tx()
        try:
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
    def _end_of_stream(self) -> NoReturn:
        if self._closed:  # our own shutdown woke a blocking read
            raise errors.ConnectionClosedError()
        if self._reader.in_frame:
            self._rx_broken = errors.TruncatedMessageError()
            raise self._rx_broken
        raise errors.PeerClosedError()

    def _receive(
        self,
        maxlength: Optional[int],
        deadline: Deadline,
        into: Optional[tuple] = None,
        head: bytes = b"",
    ) -> Any:
        """Advance the frame reader; returns the frame, or None at the deadline.

        ``head``: bytes of this frame the fast path already read. ``into=(buf, offset)``:
        a big stdlib frame that fits is read straight into ``buf`` (``Direct`` is returned).
        """
        if self._rx_broken is not None:
            raise self._rx_broken
        ready = self._rx_ready
        if ready is not None:
            self._rx_ready = None
            size = len(ready.stream) if type(ready) is OobFrame else len(ready)
            if maxlength is not None and size > maxlength:
                self._rx_broken = errors.MessageTooLongError()
                raise errors.MessageTooLongError()
            return ready
        reader = self._reader
        reader.maxlength, reader.into = maxlength, into
        # Wait in the read itself (no poll): a plain socket and no deadline.
        blocking = deadline is None and self._plain is not None
        try:
            frame = reader.feed(head) if head else None
            while frame is None:
                n = self._read_some(reader.target(), blocking)
                if n > 0:
                    frame = reader.advance(n)
                    continue
                if n == 0:
                    self._end_of_stream()
                ev = self._wait(_POLLIN, deadline)
                if ev == _CLOSED:
                    raise errors.ConnectionClosedError()
                if ev == 0:
                    return None
            return frame
        except errors.MessageTooLongError:
            # As the stdlib: the payload is not read, so the stream cannot go on.
            self._rx_broken = errors.MessageTooLongError()
            raise
        except errors.ProtocolError as exc:
            self._rx_broken = exc
            raise
        finally:
            # Leaving mid-payload (deadline, KeyboardInterrupt): keep what came in our own
            # buffer, not the caller's.
            reader.keep_partial()
            reader.into = None

    def _receive_new(self, maxlength: Optional[int], deadline: Deadline) -> Any:
        """``_receive`` when no frame is under way on a plain socket or a pipe: the header,
        then a small payload, each with one read, as the stdlib does."""
        sock: Any = self._plain  # None only where use_read is true below
        fd = self._fd
        # os.read() (the stdlib's call) where it waits as it should: on a pipe end, which is
        # non-blocking, and on a socket with no deadline, which blocks. It costs far fewer
        # instructions than socket.recv(); with a deadline a socket needs MSG_DONTWAIT.
        use_read = sock is None or deadline is None
        try:
            head = os.read(fd, 4) if use_read else sock.recv(4, _DONTWAIT)
        except BlockingIOError:
            return self._receive(maxlength, deadline)
        except ConnectionResetError:
            head = b""
        if len(head) < 4:
            if not head:
                self._end_of_stream()
            return self._receive(maxlength, deadline, head=head)
        (size,) = _unpack_header(head)
        if not 0 <= size <= self._small_limit or (maxlength is not None and size > maxlength):
            return self._receive(maxlength, deadline, head=head)
        # The sender wrote header and small payload with one call: it is usually here.
        try:
            data = os.read(fd, size) if use_read else sock.recv(size, _DONTWAIT)
        except (BlockingIOError, ConnectionResetError):
            data = b""
        except BaseException:
            self._reader.feed(head)  # e.g. KeyboardInterrupt: the header is not lost
            raise
        if len(data) == size:
            return data
        return self._receive(maxlength, deadline, head=head + data)

    def _rest_of_frame(self, head: bytes, as_sent: bool = False) -> Any:
        """The C fast path (``_core.SocketFast``) read ``head``, the start of a frame (maybe
        nothing) that it does not finish: the whole frame, as ``recv_bytes`` returns it, or
        (``as_sent``) as ``recv_frame(..., as_sent=True)`` does, for ``recv``.
        Under the receive gate, with no deadline."""
        frame = self._receive(None, None, head=head)
        if as_sent:
            return frame
        if type(frame) is OobFrame:
            return frame.in_band()
        return frame if type(frame) is bytes else bytes(frame)

    def recv_frame(
        self,
        maxlength: Optional[int],
        deadline: Deadline,
        into: Optional[tuple] = None,
        as_sent: bool = False,
    ) -> Any:
        """One frame; TimeoutError at the deadline. ``into``: as ``_receive``'s. An
        out-of-band frame comes back pickled in-band (the caller wants bytes) unless
        ``as_sent``. One method for every receive: each call layer costs a message."""
        # _enter_rx()/_leave_rx() written out, for the same reason.
        gate = self._rx_gate
        gate.acquire()
        try:
            if self._closed:
                raise errors.ConnectionClosedError()
            reader = self._reader
            if into is None and self._rx_plain and self._rx_broken is None and not reader.in_frame:
                frame = self._receive_new(maxlength, deadline)
            else:
                frame = self._receive(maxlength, deadline, into)
        finally:
            gate.release()
            if self._closed:
                self._release_if_idle()
        if frame is None:
            raise errors.TimeoutError("recv timed out")
        if type(frame) is OobFrame and not as_sent:
            return frame.in_band()
        return frame

    def recv_object(self, deadline: Deadline, copy: bool = True) -> Any:
        frame = self.recv_frame(None, deadline, None, True)
        if type(frame) is OobFrame:
            return frame.loads()
        return pickle.loads(frame)

    def recv_frame_into(self, buf: memoryview, offset: int, deadline: Deadline) -> int:
        frame = self.recv_frame(None, deadline, (buf, offset))
        if type(frame) is Direct:
            return frame.size
        size = len(frame)
        if offset + size > len(buf):
            raise errors.BufferTooShort(bytes(frame))
        buf[offset : offset + size] = frame
        return size

    def poll(self, deadline: Deadline) -> bool:
        self._enter_rx()
        try:
            if self._rx_broken is not None or self._rx_ready is not None:
                return True
            if not self._is_ssl:
                ev = self._wait(_POLLIN, deadline)
                if ev == _CLOSED:
                    raise errors.ConnectionClosedError()
                return bool(ev)
            # TLS: readable bytes may be protocol records (e.g. session tickets) and not a
            # message, so read what is there and answer for a whole frame.
            while True:
                try:
                    frame = self._receive(None, time.monotonic())
                except (EOFError, OSError) as exc:
                    if isinstance(exc, errors.ConnectionClosedError):
                        raise
                    self._rx_broken = exc
                    return True
                if frame is not None:
                    self._rx_ready = frame
                    return True
                if self._sock.pending():  # type: ignore[union-attr]
                    continue
                ev = self._wait(_POLLIN, deadline)
                if ev == _CLOSED:
                    raise errors.ConnectionClosedError()
                if not ev:
                    return False
        finally:
            self._leave_rx()

    def fast_path(self, connection: Any, methods: dict) -> Any:
        # Only where the Python path's common case is the whole story: a plain socket (not
        # a pipe end, which waits in poll(); not TLS) and no max_message_size to check.
        if (
            _core is None
            or not C_FAST_PATH
            or self._plain is None
            or self.max_message_size is not None
        ):
            return None
        # send/recv of small flat objects too, pickled as send_object does, unless the
        # Connection encodes objects with a codec of its own.
        pickler = None
        if getattr(connection(), "_codec", None) is None:
            protocol = _framing.OOB_PROTOCOL if self._oob else pickle.DEFAULT_PROTOCOL
            pickler = (pickle.dumps, pickle.loads, protocol, _framing.FLAT_MAX_ITEMS)
        return _core.socket_fast_path(
            connection, methods, self, self._fd, _JOIN_LIMIT, self._small_limit, pickler,
            self._spin_us * 1000,
        )

    # -- pickling ---------------------------------------------------------------------
    def reduce(self) -> tuple:
        from multiprocessing import reduction

        if self._is_ssl:
            raise TypeError("a TLS connection cannot be sent to another process")
        args = (reduction.DupFd(self._fd), self.max_message_size, self._oob, self._spin_us)
        return _rebuild_socket_transport, args

    def statistics(self) -> dict:
        return {"transport": self.name, "send_backlog": self.send_backlog(), "oob": self._oob}


def _raise_send_error(exc: OSError) -> NoReturn:
    if exc.errno in _ERRNO_PEER_GONE:
        raise errors.BrokenPipeError(exc.errno, os.strerror(exc.errno)) from None
    raise exc


def _rebuild_socket_transport(
    dupfd: Any, max_message_size: Optional[int], oob: bool = False, spin_us: int = 0
) -> SocketTransport:
    return SocketTransport(
        dupfd.detach(), max_message_size=max_message_size, oob=oob, spin_us=spin_us
    )


def _peer_on_this_host(sock: Any) -> bool:
    """An AF_UNIX socket, or a TCP one connected to a loopback address."""
    if sock.family == getattr(socket, "AF_UNIX", None):
        return True
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        address = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
    except (OSError, ValueError, IndexError, AttributeError):
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _check_spin_us(spin_us: int) -> None:
    if not 0 <= spin_us <= 10_000_000:
        raise ValueError("spin_us must be between 0 and 10,000,000 (10 s)")


def socket_pipe(
    duplex: bool = True, *, spin_us: int = SPIN_US
) -> tuple[SocketTransport, SocketTransport]:
    """Two connected ends: a socketpair (duplex) or an ``os.pipe`` (reader, writer).

    Both ends are ours, so they exchange out-of-band frames. ``spin_us``: how long a
    receive with no deadline spins before it blocks (``SPIN_US``; a pipe end never spins).
    """
    _check_spin_us(spin_us)
    if duplex:
        # The kernel's default buffer sizes: raising them to 4 MiB made no measurable
        # difference for big arrays (see docs/wire.md), and kept them as the stdlib's.
        s1, s2 = socket.socketpair()
        return (
            SocketTransport(sock=s1, oob=True, spin_us=spin_us),
            SocketTransport(sock=s2, oob=True, spin_us=spin_us),
        )
    r, w = os.pipe()
    return SocketTransport(r), SocketTransport(w, oob=True)
