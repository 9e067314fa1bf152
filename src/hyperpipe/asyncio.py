"""``hyperpipe.asyncio``: await on a hyperpipe Connection, on asyncio or uvloop.

``AsyncConnection(conn)`` wraps any hyperpipe ``Connection``; every method is a coroutine
that never blocks the event loop::

    reply = await aconn.recv()
    await aconn.send(obj)
    async for message in aconn:      # ends at EOF
        ...

How it works: each call first tries the synchronous method with ``timeout=0`` (a
non-blocking attempt). When nothing can be done yet it waits for the connection's file
descriptor to become readable (``loop.add_reader``), or for the room to write the transport
describes (``Connection.arm_writable``/``writable_fileno``), and tries again. There is no
thread per call and no polling loop. Only public ``Connection`` methods are used.

Cancellation is safe because the transports are: a receive that did not complete keeps the
part of the frame that arrived inside the transport, so the next ``recv`` returns that
message whole; a send either puts a whole frame in the stream (the socket transport
finishes a started frame in the background) or nothing at all.

``connect()`` and ``serve()`` are the asynchronous ``Client`` and ``Listener``: same
addresses, authkey handshake (``hyperpipe._auth``) and TLS (``ssl_context=``), run on
non-blocking sockets in the event loop.

An ``AsyncConnection`` is used from one event loop (it looks up the running loop on every
call); do not use its underlying ``Connection`` from other threads at the same time.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
import ssl
import time
from multiprocessing.reduction import ForkingPickler
from typing import Any, Awaitable, Callable, Generic, Optional, TypeVar

from . import _auth, errors
from ._connection import Connection, fast_path_of
from ._pipe import Pipe

__all__ = ["AsyncConnection", "open_pipe", "connect", "serve", "Server"]

_SendT = TypeVar("_SendT")
_RecvT = TypeVar("_RecvT")

logger = logging.getLogger("hyperpipe.asyncio")

# When no descriptor can tell (a transport without one, a descriptor that stays readable
# without a message, a send queued behind the socket transport's background flush or
# behind the cap on bytes in flight), wait with sleeps that grow from the first to the
# last value instead of spinning.
_BACKOFF_FIRST = 0.0002
_BACKOFF_LAST = 0.002


def _fd_readable_now(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _wake(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)


#: How long an awaited receive on shared memory may spin (GIL released, blocking the loop)
#: for a small reply before it goes the general way (a non-blocking attempt, then the
#: loop's readiness): a loop wake-up through the eventfd costs ~10-20 µs, a reply from a
#: peer that is awake arrives within a microsecond or two. Adaptive per connection: a
#: spin that catches nothing halves the next one (down to none) unless the message then
#: came soon after all, which doubles it back (AsyncConnection._after_spin).
_SPIN_MAX = 20e-6
_SPIN_MIN = 1e-6


try:
    from ._core import Endpoint as _Endpoint
    from ._core import aio_try_recv_bytes as _try_recv_bytes
    from ._core import aio_try_send_bytes as _try_send_bytes
except ImportError:  # no C core (or one built before it had these): the general way only
    _Endpoint = _try_recv_bytes = _try_send_bytes = None  # type: ignore[assignment,misc]


def _c_endpoint(conn: Connection[Any, Any]) -> Any:
    """The shared-memory C endpoint doing the Connection's fast path, or None."""
    fast = fast_path_of(conn)
    return fast if _Endpoint is not None and type(fast) is _Endpoint else None


#: How long a receive may spin (blocking the loop) for a big message the peer announced it
#: is copying to us (shared memory): a 1 MiB copy takes ~50-100 µs, less than a sleep and
#: wake-up of the loop costs; longer copies are waited for as usual.
_CATCH_SECONDS = 200e-6


class _Readiness:
    """Waiters for one direction of one descriptor: one loop callback wakes them all."""

    __slots__ = ("writing", "waiters", "fd", "loop")

    def __init__(self, writing: bool) -> None:
        self.writing = writing
        self.waiters: list[asyncio.Future[None]] = []
        self.fd = -1
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    async def wait(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        if self.waiters and (self.fd != fd or self.loop is not loop):
            raise RuntimeError("an AsyncConnection is being used from two event loops at once")
        fut = loop.create_future()
        if not self.waiters:
            self.fd, self.loop = fd, loop
            if self.writing:
                loop.add_writer(fd, self._fire)
            else:
                loop.add_reader(fd, self._fire)
        self.waiters.append(fut)
        try:
            await fut
        finally:
            try:
                self.waiters.remove(fut)
            except ValueError:
                pass
            if not self.waiters:
                self._unregister()

    def _fire(self) -> None:
        waiters, self.waiters = self.waiters, []
        self._unregister()
        for fut in waiters:
            _wake(fut)

    def _unregister(self) -> None:
        loop, self.loop = self.loop, None
        if loop is None or loop.is_closed():
            return
        if self.writing:
            loop.remove_writer(self.fd)
        else:
            loop.remove_reader(self.fd)

    def abort(self, exc: BaseException) -> None:
        """Stop watching the descriptor (before it is closed) and fail every waiter."""
        waiters, self.waiters = self.waiters, []
        self._unregister()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(exc)


class AsyncConnection(Generic[_SendT, _RecvT]):
    """An awaitable view of a hyperpipe ``Connection`` (it owns the Connection).

    Methods and exceptions mirror ``Connection``: ``send``, ``send_bytes``, ``recv``,
    ``recv_bytes``, ``recv_bytes_into``, ``poll``, ``close`` -- the blocking ones are
    coroutines. Each takes an optional keyword ``timeout=`` (seconds) that raises
    ``hyperpipe.TimeoutError``; ``asyncio.timeout()`` / ``wait_for`` / ``Task.cancel``
    work as well and lose nothing.
    """

    def __init__(self, conn: Connection[_SendT, _RecvT]) -> None:
        if not isinstance(conn, Connection):
            raise TypeError(
                f"AsyncConnection needs a hyperpipe.Connection, not {type(conn).__name__}"
            )
        self._conn = conn
        self._readable = _Readiness(writing=False)
        # Room to write: the descriptor itself writable (socket), or a wake-up descriptor
        # readable (shared memory), as the transport says.
        self._writable = _Readiness(writing=True)
        self._room = _Readiness(writing=False)
        self._recv_lock: Optional[asyncio.Lock] = None
        self._send_lock: Optional[asyncio.Lock] = None
        # Receives/sends in progress (queued on the lock or waiting): while there are none,
        # a call first tries at once, with no lock and no extra coroutine.
        self._receivers = 0
        self._senders = 0
        # Shared memory with the C core: a first try in one C call, no Connection layers
        # (aio_try_send_bytes / aio_try_recv_bytes), before the general way.
        ep = _c_endpoint(conn)
        self._ep_tx = ep if conn.writable else None
        self._ep_rx = ep if conn.readable else None
        # recv() may unpickle what the first try got as the transport would: pickle, no codec.
        self._ep_rx_obj = self._ep_rx if getattr(conn, "_codec", None) is None else None
        self._spin = _SPIN_MAX

    # -- the wrapped connection ---------------------------------------------------
    @property
    def connection(self) -> Connection[_SendT, _RecvT]:
        """The synchronous Connection underneath."""
        return self._conn

    @property
    def closed(self) -> bool:
        return self._conn.closed

    @property
    def readable(self) -> bool:
        return self._conn.readable

    @property
    def writable(self) -> bool:
        return self._conn.writable

    @property
    def transport(self) -> str:
        return self._conn.transport

    def fileno(self) -> int:
        return self._conn.fileno()

    def statistics(self) -> dict:
        return self._conn.statistics()

    def close(self) -> None:
        """Close the connection; coroutines waiting on it raise ``ConnectionClosedError``."""
        # Stop the loop watching the descriptor before it is closed (and maybe reused).
        for readiness in (self._readable, self._writable, self._room):
            readiness.abort(errors.ConnectionClosedError())
        self._conn.close()

    async def drain(self) -> None:
        """Wait until every accepted message has been handed to the operating system.

        ``await send(...)`` returns once the message is accepted whole; with the socket
        transport the tail of a big one may still be being written by the transport's
        background thread (``close()`` lets it finish before the descriptor closes, but
        the process must live that long). ``aclose()`` and ``async with`` drain first;
        wrap in ``asyncio.timeout`` to bound the wait.
        """
        backoff = _BACKOFF_FIRST
        while self._conn.send_backlog():
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_LAST)

    async def aclose(self) -> None:
        """Drain what was sent, then close."""
        try:
            if not self._conn.closed and self._conn.writable:
                await self.drain()
        finally:
            self.close()

    async def __aenter__(self) -> "AsyncConnection[_SendT, _RecvT]":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    def __aiter__(self) -> "AsyncConnection[_SendT, _RecvT]":
        return self

    async def __anext__(self) -> _RecvT:
        try:
            return await self.recv()
        except EOFError:
            raise StopAsyncIteration from None

    def __repr__(self) -> str:
        return f"<hyperpipe.asyncio.AsyncConnection {self._conn!r}>"

    # -- the two wait loops -------------------------------------------------------
    def _lock(self, sending: bool) -> asyncio.Lock:
        # Made on first use, inside a running loop (Python 3.9 binds a Lock at creation).
        lock = self._send_lock if sending else self._recv_lock
        if lock is None:
            lock = asyncio.Lock()
            if sending:
                self._send_lock = lock
            else:
                self._recv_lock = lock
        return lock

    async def _at_once_or_in_turn(
        self,
        idle: bool,
        attempt: Callable[[], Any],
        in_turn: Callable[[bool], Awaitable[Any]],
        timeout: Optional[float],
        what: str,
    ) -> Any:
        """One call: ``attempt()`` at once when no other call of its direction is in
        progress (``idle``), else, or when that times out, ``in_turn(tried)``, which queues
        behind the others; ``tried`` tells it the attempt was just made."""
        if timeout is not None and timeout != timeout:
            raise ValueError("timeout must be a number or None")
        if idle:
            try:
                return attempt()
            except errors.TimeoutError:
                pass
        return await self._within(timeout, in_turn(idle), what)

    def _receiving(self, attempt: Callable[[], Any], timeout: Optional[float], what: str) -> Awaitable[Any]:
        return self._at_once_or_in_turn(
            not self._receivers, attempt, lambda tried: self._receive(attempt, tried=tried), timeout, what
        )

    async def _receive(self, attempt: Callable[[], Any], *, ordered: bool = True, tried: bool = False) -> Any:
        if not ordered:
            return await self._receive_unlocked(attempt)
        # Concurrent receives complete in the order they were called.
        self._receivers += 1
        try:
            async with self._lock(sending=False):
                return await self._receive_unlocked(attempt, tried)
        finally:
            self._receivers -= 1

    async def _receive_unlocked(self, attempt: Callable[[], Any], tried: bool = False) -> Any:
        conn = self._conn
        woken = False
        backoff = _BACKOFF_FIRST
        while True:
            if tried:
                # The caller's attempt just failed: wait for readiness (which also sees a
                # message that came in between) rather than pay another failed attempt.
                tried = False
            else:
                try:
                    return attempt()
                except errors.TimeoutError:
                    pass
            if conn.catch_incoming(_CATCH_SECONDS):
                continue  # a big message being copied to us landed while we spun
            if not conn.capabilities.readable_fd:
                await asyncio.sleep(backoff)  # no descriptor to wait on
                backoff = min(backoff * 2, _BACKOFF_LAST)
                continue
            if woken:
                # Readiness said yes but no whole message came: part of a frame arrived
                # (more is on its way) or the wake-up was stale. poll(0) consumes a stale
                # wake-up of the shared-memory transport and says whether to try again.
                if conn.poll(0):
                    await asyncio.sleep(0)  # progress: let other tasks run, then continue
                    continue
                if _fd_readable_now(conn.fileno()):
                    # The descriptor stays readable with nothing to read: waiting on it
                    # would spin, so sleep instead (a transport should not do this).
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_LAST)
                    continue
            backoff = _BACKOFF_FIRST
            await self._readable.wait(conn.fileno())
            woken = True

    def _sending(self, attempt: Callable[[], None], timeout: Optional[float], what: str) -> Awaitable[None]:
        return self._at_once_or_in_turn(
            not self._senders, attempt, lambda tried: self._send(attempt, tried), timeout, what
        )

    async def _send(self, attempt: Callable[[], None], tried: bool = False) -> None:
        """Try ``attempt()``; while it times out, wait for room to write and try again."""
        self._senders += 1
        try:
            async with self._lock(sending=True):
                await self._send_locked(attempt, tried)
        finally:
            self._senders -= 1

    async def _send_locked(self, attempt: Callable[[], None], tried: bool) -> None:
        if not tried:
            try:
                attempt()
                return
            except errors.TimeoutError:
                pass
        conn = self._conn
        backoff = _BACKOFF_FIRST
        fits_but_failed = False
        while True:
            if fits_but_failed or conn.send_backlog() or not conn.capabilities.writable_fd:
                # No descriptor tells when: the transport has none, it is still flushing an
                # earlier message from another thread, or the frame fitted and the send
                # still timed out (e.g. the cap on bytes in flight). Sleep, then ask again.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_LAST)
                fits_but_failed = False
            elif conn.arm_writable():
                fits_but_failed = True  # retry at once
            else:
                fd, event = conn.writable_fileno()
                await (self._writable if event == select.POLLOUT else self._room).wait(fd)
            try:
                attempt()
                return
            except errors.TimeoutError:
                pass

    @staticmethod
    async def _within(timeout: Optional[float], coro: Awaitable[Any], what: str) -> Any:
        if timeout is None:
            return await coro
        if timeout != timeout:
            coro.close()  # type: ignore[attr-defined]
            raise ValueError("timeout must be a number or None")
        try:
            return await asyncio.wait_for(coro, max(0.0, timeout))
        except asyncio.TimeoutError:
            raise errors.TimeoutError(f"{what} timed out") from None

    # -- sending ------------------------------------------------------------------
    async def send(self, obj: _SendT, *, timeout: Optional[float] = None) -> None:
        """Send a picklable object (or one the connection's codec encodes)."""
        conn = self._conn
        await self._sending(lambda: conn.send(obj, timeout=0), timeout, "send")

    async def send_bytes(
        self, buf: Any, offset: int = 0, size: Optional[int] = None, *, timeout: Optional[float] = None
    ) -> None:
        """Send ``buf[offset:offset+size]`` (bytes) as one message."""
        ep = self._ep_tx
        if (
            ep is not None
            and timeout is None
            and size is None
            and type(offset) is int
            and not offset
            and not self._senders
            and _try_send_bytes(ep, buf)
        ):
            return
        conn = self._conn
        await self._sending(lambda: conn.send_bytes(buf, offset, size, timeout=0), timeout, "send_bytes")

    async def send_bytes_many(self, bufs: Any, *, timeout: Optional[float] = None) -> None:
        """Send each buffer as its own message; all of them go, or (on timeout/cancel) none."""
        conn = self._conn
        bufs = list(bufs)
        await self._sending(lambda: conn.send_bytes_many(bufs, timeout=0), timeout, "send_bytes_many")

    # -- receiving ----------------------------------------------------------------
    async def recv(self, *, timeout: Optional[float] = None, copy: bool = True) -> _RecvT:
        """Receive one object; EOFError once the peer closed and everything was read."""
        ep = self._ep_rx_obj
        if ep is not None and timeout is None and not self._receivers:
            data = _try_recv_bytes(ep, self._spin)
            if data is not None:
                return ForkingPickler.loads(data)  # as the transport does with a DATA frame
            return await self._after_spin(self._receiving(lambda: self._conn.recv(timeout=0, copy=copy), None, "recv"))
        conn = self._conn
        return await self._receiving(lambda: conn.recv(timeout=0, copy=copy), timeout, "recv")

    async def recv_bytes(
        self, maxlength: Optional[int] = None, *, timeout: Optional[float] = None
    ) -> bytes:
        """Receive one message as bytes."""
        ep = self._ep_rx
        if ep is not None and maxlength is None and timeout is None and not self._receivers:
            data = _try_recv_bytes(ep, self._spin)
            if data is not None:
                return data
            return await self._after_spin(self._receiving(lambda: self._conn.recv_bytes(timeout=0), None, "recv_bytes"))
        conn = self._conn
        return await self._receiving(lambda: conn.recv_bytes(maxlength, timeout=0), timeout, "recv_bytes")

    async def _after_spin(self, receiving: Awaitable[Any]) -> Any:
        """The general way after a first try that caught nothing; adapts the next spin: a
        message that came soon (within 4x the longest spin, measured through the loop's
        own wake-up) would likely have been caught (double it), one that came later was
        not worth this spin (halve it, down to none)."""
        spun = self._spin
        start = time.perf_counter()
        try:
            return await receiving
        finally:
            if time.perf_counter() - start < 4 * _SPIN_MAX:
                self._spin = min(_SPIN_MAX, max(_SPIN_MIN, spun * 2))
            elif spun:
                self._spin = 0.0 if spun / 2 < _SPIN_MIN else spun / 2

    async def recv_bytes_into(
        self, buf: Any, offset: int = 0, *, timeout: Optional[float] = None
    ) -> int:
        """Receive one message into ``buf`` at byte ``offset``; returns its size."""
        conn = self._conn
        return await self._receiving(
            lambda: conn.recv_bytes_into(buf, offset, timeout=0), timeout, "recv_bytes_into"
        )

    async def recv_bytes_many(
        self, maxcount: int = 1024, *, timeout: Optional[float] = None
    ) -> list[bytes]:
        """Wait for one message, then also take those already waiting (up to ``maxcount``)."""
        conn = self._conn
        return await self._receiving(
            lambda: conn.recv_bytes_many(maxcount, timeout=0), timeout, "recv_bytes_many"
        )

    async def poll(self, timeout: Optional[float] = 0.0) -> bool:
        """Whether a message (or EOF) is ready, waiting up to ``timeout`` (None: forever)."""
        conn = self._conn
        if conn.poll(0):
            return True
        if timeout is not None and timeout <= 0:
            return False

        def attempt() -> bool:
            if conn.poll(0):
                return True
            raise errors.TimeoutError()

        try:
            return await self._within(timeout, self._receive(attempt, ordered=False), "poll")
        except errors.TimeoutError:
            return False


def open_pipe(
    duplex: bool = True, *, transport: Optional[str] = None, **options: Any
) -> tuple[AsyncConnection[Any, Any], AsyncConnection[Any, Any]]:
    """``hyperpipe.Pipe(...)`` with both ends wrapped in ``AsyncConnection``.

    To talk to another process, make a plain ``hyperpipe.Pipe()``, give one end to the
    process and wrap the other: ``AsyncConnection(conn)``.
    """
    a, b = Pipe(duplex, transport=transport, **options)
    return AsyncConnection(a), AsyncConnection(b)


# -- sockets: connect() and serve() -------------------------------------------------------


async def _sock_ready(sock: socket.socket, writing: bool) -> None:
    readiness = _Readiness(writing)
    await readiness.wait(sock.fileno())


async def _tls_handshake(sock: ssl.SSLSocket) -> None:
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await _sock_ready(sock, writing=False)
        except ssl.SSLWantWriteError:
            await _sock_ready(sock, writing=True)


async def _authenticate(sock: socket.socket, steps: Any) -> None:
    reader = _auth.HandshakeReader(sock, steps)
    while not reader.advance():
        await _sock_ready(sock, writing=reader.wants_write)


async def _secure(
    sock: socket.socket,
    *,
    server_side: bool,
    ssl_context: Optional[ssl.SSLContext],
    authkey: Optional[bytes],
    server_hostname: Optional[str],
) -> socket.socket:
    """TLS, then the authkey handshake, on a connected non-blocking socket."""
    plain = sock
    if ssl_context is not None:
        sock = ssl_context.wrap_socket(
            sock,
            server_side=server_side,
            server_hostname=None if server_side else server_hostname,
            do_handshake_on_connect=False,
        )
    try:
        if ssl_context is not None:
            await _tls_handshake(sock)
        if authkey is not None:
            steps = _auth.server_handshake(authkey) if server_side else _auth.client_handshake(authkey)
            await _authenticate(sock, steps)
    except BaseException:
        if sock is not plain:  # the TLS socket took the descriptor over: the caller's is empty
            sock.close()
        raise
    return sock


def _to_connection(sock: socket.socket, codec: Any, max_message_size: Optional[int]) -> AsyncConnection:
    from ._listener import _make_connection

    if not isinstance(sock, ssl.SSLSocket):
        # Blocking mode for plain sockets: the transport uses MSG_DONTWAIT per call, and
        # send_handle/recv_handle on the descriptor expect a blocking socket.
        sock.setblocking(True)
    return AsyncConnection(_make_connection(sock, codec, max_message_size))


async def connect(
    address: Any,
    *,
    family: Optional[str] = None,
    authkey: Optional[bytes] = None,
    ssl_context: Optional[ssl.SSLContext] = None,
    codec: Any = "pickle",
    timeout: Optional[float] = None,
    max_message_size: Optional[int] = None,
    handshake_timeout: Optional[float] = _auth.DEFAULT_HANDSHAKE_TIMEOUT,
    server_hostname: Optional[str] = None,
) -> AsyncConnection[Any, Any]:
    """The asynchronous ``hyperpipe.Client``: connect, TLS, authkey handshake.

    Talks to a hyperpipe or standard-library ``Listener`` (or ``serve()``). ``timeout``
    bounds everything, ``handshake_timeout`` the authkey handshake alone; both raise
    ``hyperpipe.TimeoutError``. A failed handshake raises ``AuthenticationError``.
    """
    from . import _listener
    from ._codecs import get_codec
    from ._listener import (
        _check_authkey,
        _check_max_message_size,
        _check_ssl_context,
        _validate_family,
        address_type,
    )

    family = family or address_type(address)
    _validate_family(family)
    _check_authkey(authkey)
    _check_ssl_context(ssl_context, server_side=False)
    _check_max_message_size(max_message_size)
    codec_obj = get_codec(codec)
    if ssl_context is not None and server_hostname is None and family in ("AF_INET", "AF_INET6"):
        server_hostname = address[0]

    async def establish() -> AsyncConnection[Any, Any]:
        loop = asyncio.get_running_loop()
        sock = socket.socket(getattr(socket, family))
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            plain = await _secure(
                sock,
                server_side=False,
                ssl_context=ssl_context,
                authkey=None,
                server_hostname=server_hostname,
            )
            sock = plain
            if authkey is not None:
                try:
                    await _within_handshake(
                        _authenticate(sock, _auth.client_handshake(authkey)), handshake_timeout
                    )
                except errors.TimeoutError:
                    raise errors.TimeoutError(
                        f"the authentication handshake with {address!r} did not complete "
                        "in time (does the Listener use an authkey?)"
                    ) from None
            codec_used = codec_obj
            if authkey is None and _listener._uses_default_pickle(codec_obj):
                # As Client: a server that sends a challenge gets a clear AuthenticationError.
                codec_used = _listener._ChallengeGuard()
            return _to_connection(sock, codec_used, max_message_size)
        except BaseException:
            sock.close()
            raise

    if timeout is None:
        return await establish()
    try:
        return await asyncio.wait_for(establish(), max(0.0, timeout))
    except asyncio.TimeoutError:
        raise errors.TimeoutError(f"connecting to {address!r} timed out") from None


async def _within_handshake(coro: Awaitable[Any], limit: Optional[float]) -> Any:
    if limit is None:
        return await coro
    try:
        return await asyncio.wait_for(coro, limit)
    except asyncio.TimeoutError:
        raise errors.TimeoutError("handshake timed out") from None


Handler = Callable[[AsyncConnection[Any, Any]], Awaitable[Any]]


class Server:
    """What ``serve()`` returns: a listening socket whose clients each get a handler task.

    ``async with server:`` closes it on exit, cancelling handlers still running.
    ``close()`` stops accepting (handlers continue); ``await wait_closed()`` waits for them.
    """

    def __init__(
        self,
        handler: Handler,
        sock: socket.socket,
        family: str,
        unlink_path: Optional[str],
        *,
        authkey: Optional[bytes],
        ssl_context: Optional[ssl.SSLContext],
        codec: Any,
        max_message_size: Optional[int],
        handshake_timeout: Optional[float],
    ) -> None:
        self._handler = handler
        self._sock: Optional[socket.socket] = sock
        self._family = family
        self._unlink_path = unlink_path
        self._authkey = authkey
        self._ssl_context = ssl_context
        self._codec = codec
        self._max_message_size = max_message_size
        self._handshake_timeout = handshake_timeout
        self.address = sock.getsockname()
        self._handshakes: set[asyncio.Task[Any]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closed_event = asyncio.Event()
        #: clients refused (failed or timed-out handshakes); details are logged
        self.refused = 0
        self._accept_task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(
            self._accept_loop()
        )

    @property
    def family(self) -> str:
        return self._family

    def is_serving(self) -> bool:
        return self._sock is not None

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self._sock
        assert sock is not None
        while True:
            try:
                client, peer = await loop.sock_accept(sock)
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    logger.error("accept() failed (%s); retrying in 0.1 s", exc)
                    await asyncio.sleep(0.1)
                    continue
                raise
            task = loop.create_task(self._serve_client(client, peer))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _serve_client(self, client: socket.socket, peer: Any) -> None:
        try:
            client.setblocking(False)
            sock = client
            try:
                sock = await _within_handshake(
                    _secure(
                        client,
                        server_side=True,
                        ssl_context=self._ssl_context,
                        authkey=self._authkey,
                        server_hostname=None,
                    ),
                    self._handshake_timeout,
                )
            except (errors.AuthenticationError, errors.TimeoutError, OSError, ValueError) as exc:
                self.refused += 1
                logger.warning("refused client %r: %s: %s", peer, type(exc).__name__, exc)
                client.close()
                return
            aconn = _to_connection(sock, self._codec, self._max_message_size)
        except BaseException:
            client.close()
            raise
        # The handler runs as its own task, tracked apart from handshakes.
        task = asyncio.current_task()
        assert task is not None
        self._handshakes.discard(task)
        self._handlers.add(task)
        try:
            await self._handler(aconn)
        except (EOFError, errors.BrokenPipeError, ConnectionResetError):
            pass  # the client went away: the normal end of a conversation
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("handler %r failed for client %r", self._handler, peer)
        finally:
            aconn.close()
            self._handlers.discard(task)

    def close(self) -> None:
        """Stop accepting and drop clients still in their handshake. Idempotent."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        self._accept_task.cancel()
        for task in list(self._handshakes):
            task.cancel()
        try:
            asyncio.get_running_loop().remove_reader(sock.fileno())
        except (RuntimeError, ValueError, OSError):
            pass
        sock.close()
        if self._unlink_path is not None:
            try:
                os.unlink(self._unlink_path)
            except OSError:
                pass
            self._unlink_path = None
        self._closed_event.set()

    async def wait_closed(self) -> None:
        """Wait until ``close()`` was called and every handler has returned."""
        await self._closed_event.wait()
        tasks = [self._accept_task, *self._handshakes, *self._handlers]
        tasks = [t for t in tasks if t is not asyncio.current_task()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def serve_forever(self) -> None:
        """Wait until the server is closed (or this coroutine is cancelled, which closes it)."""
        try:
            await self._closed_event.wait()
        finally:
            self.close()

    async def aclose(self) -> None:
        """Close, cancel running handlers and wait for them."""
        self.close()
        for task in list(self._handlers):
            task.cancel()
        await self.wait_closed()

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "serving" if self._sock is not None else "closed"
        return f"<hyperpipe.asyncio.Server {state} address={self.address!r}>"


async def serve(
    handler: Handler,
    address: Any = None,
    *,
    family: Optional[str] = None,
    backlog: int = 128,
    authkey: Optional[bytes] = None,
    ssl_context: Optional[ssl.SSLContext] = None,
    codec: Any = "pickle",
    max_message_size: Optional[int] = None,
    handshake_timeout: Optional[float] = _auth.DEFAULT_HANDSHAKE_TIMEOUT,
) -> Server:
    """The asynchronous ``hyperpipe.Listener``: call ``await handler(aconn)`` per client.

    Addresses, families, ``authkey`` and ``ssl_context`` are those of ``Listener``; hyperpipe
    and standard-library ``Client``s (and ``connect()``) can connect. Every handshake runs in
    its own task under ``handshake_timeout``, so a silent client holds up nobody; a client
    that fails it is closed and logged (``Server.refused`` counts them). The connection is
    closed when the handler returns; an ``EOFError`` escaping the handler is the normal end.
    """
    from ._codecs import get_codec
    from ._listener import _is_abstract_unix, _open_listening_socket

    if not callable(handler):
        raise TypeError("handler must be a coroutine function taking an AsyncConnection")
    codec_obj = get_codec(codec)
    sock, address, family = _open_listening_socket(
        address, family, backlog, authkey, ssl_context, max_message_size, handshake_timeout
    )
    unlink_path = None
    if family == "AF_UNIX" and not _is_abstract_unix(address):
        unlink_path = address
    return Server(
        handler,
        sock,
        family,
        unlink_path,
        authkey=authkey,
        ssl_context=ssl_context,
        codec=codec_obj,
        max_message_size=max_message_size,
        handshake_timeout=handshake_timeout,
    )


# -- measurement helper (for the benchmark) -----------------------------------------------


def _timed_round_trips(
    conn: Connection[Any, Any],
    message: Any,
    iters: int,
    *,
    warmup: int = 100,
    payload: str = "bytes",
    loop: str = "asyncio",
) -> tuple[list[int], Any]:
    """Time ``iters`` awaited round trips on ``conn`` (the peer echoes each message).

    Runs its own event loop (``loop="asyncio"`` or ``"uvloop"``) and returns the
    per-round-trip times in ``time.perf_counter_ns`` units and the last reply. The
    benchmark's async rows call this in the initiating process; the echoing peer is the
    same synchronous code as for the synchronous rows.
    """
    import time

    if loop == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    elif loop == "asyncio":
        factory = asyncio.new_event_loop
    else:
        raise ValueError(f"unknown loop {loop!r} (expected 'asyncio' or 'uvloop')")
    aconn: AsyncConnection[Any, Any] = AsyncConnection(conn)
    if payload == "bytes":
        send: Callable[[Any], Awaitable[None]] = aconn.send_bytes
        recv: Callable[[], Awaitable[Any]] = aconn.recv_bytes
    else:
        send, recv = aconn.send, aconn.recv

    async def measure() -> tuple[list[int], Any]:
        clock = time.perf_counter_ns
        reply = None
        for _ in range(warmup):
            await send(message)
            reply = await recv()
        samples = []
        for _ in range(iters):
            t0 = clock()
            await send(message)
            reply = await recv()
            samples.append(clock() - t0)
        return samples, reply

    event_loop = factory()
    try:
        return event_loop.run_until_complete(measure())
    finally:
        event_loop.close()
