"""``Listener`` and ``Client``: hyperpipe Connections over Unix and TCP sockets.

The signatures, addresses, errors and wire format are those of
``multiprocessing.connection`` (a hyperpipe ``Client`` talks to a standard-library
``Listener`` and the reverse, with or without an authkey, Python 3.11 or 3.12+ on the
other side). The extras are keyword-only:

- ``ssl_context=``: a standard ``ssl.SSLContext`` wraps the socket (mutual TLS when the
  server context has ``verify_mode = CERT_REQUIRED``). The HMAC handshake, when there is
  an authkey, runs inside TLS.
- ``codec=``: ``"pickle"`` (default, standard-compatible), ``"json"``, ``"msgpack"`` or
  any object with ``dumps``/``loads`` (see ``_codecs``): what ``send``/``recv`` use.
- ``max_message_size=``: a frame announcing more is refused from its header, before
  anything is allocated for it.
- ``Listener(handshake_timeout=)``: a client gets this long to finish TLS and the authkey
  handshake. ``accept()`` runs the handshakes of all waiting clients side by side, on
  non-blocking sockets, so a client that connects and says nothing holds up nobody.
- ``accept(timeout=)`` and ``Client(timeout=)`` (connect, TLS and handshake together)
  raise ``hyperpipe.TimeoutError``.

A client whose handshake fails makes ``accept()`` raise ``AuthenticationError`` (as the
standard library does for a wrong key); the Listener stays open and the next
``accept()`` serves the next client.
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import selectors
import socket
import ssl
import sys
import tempfile
import threading
import time
import weakref
from typing import Any, Optional

from . import _auth, _framing
from ._codecs import PickleCodec, get_codec
from .errors import AuthenticationError
from .errors import TimeoutError as HyperpipeTimeoutError

__all__ = [
    "Listener",
    "Client",
    "address_type",
    "arbitrary_address",
    "families",
    "default_family",
]

default_family = "AF_INET"
families = ["AF_INET"]
if socket.has_ipv6:
    families.append("AF_INET6")
if hasattr(socket, "AF_UNIX"):
    default_family = "AF_UNIX"
    families.append("AF_UNIX")

#: Handshakes that ``accept()`` runs side by side; more clients wait in the kernel backlog.
MAX_PENDING_HANDSHAKES = 256

_address_counter = itertools.count()


def arbitrary_address(family: str) -> Any:
    """An unused address for ``family`` (like ``multiprocessing.connection``)."""
    if family == "AF_INET":
        return ("localhost", 0)
    if family == "AF_INET6":
        return ("::1", 0)
    if family == "AF_UNIX":
        from multiprocessing import util

        return tempfile.mktemp(prefix="listener-", dir=util.get_temp_dir())
    raise ValueError("unrecognized family")


def _is_abstract_unix(address: Any) -> bool:
    if sys.platform != "linux":
        return False
    if isinstance(address, bytes):
        return address.startswith(b"\0")
    return isinstance(address, str) and address.startswith("\0")


def address_type(address: Any) -> str:
    """``'AF_INET'``, ``'AF_INET6'`` or ``'AF_UNIX'`` for an address."""
    if type(address) == tuple:  # noqa: E721 - the stdlib rejects tuple subclasses too
        if len(address) == 4 or (isinstance(address[0], str) and ":" in address[0]):
            return "AF_INET6"
        return "AF_INET"
    if type(address) is str and address.startswith("\\\\"):
        return "AF_PIPE"
    if type(address) is str or _is_abstract_unix(address):
        return "AF_UNIX"
    raise ValueError(f"address type of {address!r} unrecognized")


def _validate_family(family: str) -> None:
    if family not in families:
        raise ValueError(f"Family {family} is not recognized.")


def _check_authkey(authkey: Any) -> None:
    if authkey is not None and not isinstance(authkey, bytes):
        raise TypeError("authkey should be a byte string")


def _check_ssl_context(ssl_context: Any, *, server_side: bool) -> None:
    if ssl_context is None:
        return
    if not isinstance(ssl_context, ssl.SSLContext):
        raise TypeError(f"ssl_context must be an ssl.SSLContext, not {type(ssl_context).__name__}")
    wrong = ssl.PROTOCOL_TLS_CLIENT if server_side else ssl.PROTOCOL_TLS_SERVER
    if ssl_context.protocol == wrong:
        side = "a server-side (PROTOCOL_TLS_SERVER)" if server_side else "a client-side"
        raise ValueError(f"{'Listener' if server_side else 'Client'} needs {side} ssl_context")


def _check_max_message_size(max_message_size: Any) -> None:
    if max_message_size is not None:
        if not isinstance(max_message_size, int) or max_message_size < 0:
            raise ValueError("max_message_size must be a non-negative int or None")


class _ChallengeGuard:
    """Pickle, except that a first message that is an authkey challenge raises clearly.

    Used by a ``Client`` without an authkey: a server that wants one sends
    ``#CHALLENGE#...`` first, which pickle would report as "invalid load key, '#'".
    No pickle starts with ``#`` (not an opcode), so nothing legitimate is caught.
    """

    name = "pickle"

    def __init__(self) -> None:
        self._first = True

    # Every message of the connection comes here: no import statement, no ForkingPickler
    # for a flat object (the same bytes, _framing.dumps), pickle.loads (ForkingPickler's).
    dumps = staticmethod(_framing.dumps)

    def loads(self, buffer: Any) -> Any:
        if self._first:
            self._first = False
            if bytes(buffer[: len(_auth.CHALLENGE)]) == _auth.CHALLENGE:
                raise AuthenticationError(
                    "the server sent an authentication challenge: it needs an authkey "
                    "and this Client has none"
                )
        return pickle.loads(buffer)


def _uses_default_pickle(codec: Any) -> bool:
    return type(codec) is PickleCodec and codec.protocol == PickleCodec().protocol


def _make_connection(
    sock: socket.socket, codec: Any, max_message_size: Optional[int], oob: bool = False
) -> Any:
    """Hand a connected, authenticated socket to a hyperpipe Connection (it takes ownership).

    ``oob``: the peer announced that it reads out-of-band frames (the handshake found out).
    """
    from ._connection import Connection
    from ._socket_transport import SocketTransport

    # No TCP_NODELAY: every frame goes out with one write call anyway, and with it each
    # small message of a stream costs the sender a segment of its own (measured: 100-byte
    # streaming at half the stdlib's rate, docs/wire.md).
    transport = SocketTransport.from_socket(sock, max_message_size=max_message_size, oob=oob)
    if _uses_default_pickle(codec):
        return Connection(transport)  # the Connection's own pickle path (stdlib-identical)
    return Connection(transport, codec=codec)


class _PendingClient:
    """A client accepted by the kernel whose TLS and/or authkey handshake is under way."""

    def __init__(
        self,
        sock: socket.socket,
        peer: Any,
        deadline: Optional[float],
        ssl_context: Optional[ssl.SSLContext],
        authkey: Optional[bytes],
    ) -> None:
        sock.setblocking(False)
        self.peer = peer
        self.deadline = deadline
        self.tls_done = ssl_context is None
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        self.sock = sock
        steps = _auth.server_handshake(authkey) if authkey is not None else None
        self.reader = _auth.HandshakeReader(sock, steps)
        self.wants_write = False

    def advance(self) -> bool:
        """True when done; False to wait (see ``wants_write``); raises on failure."""
        if not self.tls_done:
            try:
                self.sock.do_handshake()  # type: ignore[attr-defined]
            except ssl.SSLWantReadError:
                self.wants_write = False
                return False
            except ssl.SSLWantWriteError:
                self.wants_write = True
                return False
            self.tls_done = True
        done = self.reader.advance()
        self.wants_write = self.reader.wants_write
        return done

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _open_listening_socket(
    address: Any,
    family: Optional[str],
    backlog: int,
    authkey: Optional[bytes],
    ssl_context: Optional[ssl.SSLContext],
    max_message_size: Optional[int],
    handshake_timeout: Optional[float],
) -> tuple[socket.socket, Any, str]:
    """Check a listener's arguments, then bind and listen: ``(socket, address, family)``.

    Shared by ``Listener`` and ``hyperpipe.asyncio.serve``; the socket is non-blocking.
    """
    family = family or (address and address_type(address)) or default_family
    address = address or arbitrary_address(family)
    _validate_family(family)
    _check_authkey(authkey)
    _check_ssl_context(ssl_context, server_side=True)
    _check_max_message_size(max_message_size)
    if handshake_timeout is not None and handshake_timeout <= 0:
        raise ValueError("handshake_timeout must be positive or None")
    sock = socket.socket(getattr(socket, family))
    try:
        if os.name == "posix" and family != "AF_UNIX":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, address, family


class Listener:
    """A bound, listening socket whose ``accept()`` returns hyperpipe Connections."""

    def __init__(
        self,
        address: Any = None,
        family: Optional[str] = None,
        backlog: int = 1,
        authkey: Optional[bytes] = None,
        *,
        ssl_context: Optional[ssl.SSLContext] = None,
        codec: Any = "pickle",
        max_message_size: Optional[int] = None,
        handshake_timeout: Optional[float] = _auth.DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        self._codec = get_codec(codec)
        sock, address, family = _open_listening_socket(
            address, family, backlog, authkey, ssl_context, max_message_size, handshake_timeout
        )
        self._authkey = authkey
        self._ssl_context = ssl_context
        self._max_message_size = max_message_size
        self._handshake_timeout = handshake_timeout
        self._family = family
        self._address = sock.getsockname()
        self._socket: Optional[socket.socket] = sock
        self._last_accepted: Any = None
        if family == "AF_UNIX" and not _is_abstract_unix(address):
            self._unlink: Optional[weakref.finalize] = weakref.finalize(self, _unlink, address)
        else:
            self._unlink = None

        # close() from another thread wakes a blocked accept() through this pair.
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._listening_registered = True
        self._pending: dict[int, _PendingClient] = {}
        self._ready: collections.deque[_PendingClient] = collections.deque()
        self._failures: collections.deque[BaseException] = collections.deque()
        self._accept_lock = threading.Lock()
        self._closed = False

    # -- accepting ------------------------------------------------------------------
    def accept(self, timeout: Optional[float] = None) -> Any:
        """Accept a client and return a Connection; ``timeout`` in seconds or None.

        Raises ``hyperpipe.TimeoutError`` when no client finished connecting in time,
        ``AuthenticationError`` when a client failed its handshake (the Listener stays
        usable), ``OSError('listener is closed')`` once closed.
        """
        if self._socket is None:
            raise OSError("listener is closed")
        if timeout is not None and timeout < 0:
            timeout = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._accept_lock:
            while True:
                if self._closed:
                    raise OSError("listener is closed")
                if self._ready:
                    return self._hand_over(self._ready.popleft())
                if self._failures:
                    raise self._failures.popleft()
                self._wait_and_advance(deadline)
                if not self._ready and not self._failures:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise HyperpipeTimeoutError("accept timed out")

    def _wait_and_advance(self, deadline: Optional[float]) -> None:
        now = time.monotonic()
        wait_until = deadline
        for pending in self._pending.values():
            if pending.deadline is not None and (wait_until is None or pending.deadline < wait_until):
                wait_until = pending.deadline
        wait = None if wait_until is None else max(0.0, wait_until - now)
        events = self._selector.select(wait)
        for key, _mask in events:
            if key.fileobj is self._wake_reader:
                try:
                    while self._wake_reader.recv(64):
                        pass
                except (BlockingIOError, OSError):
                    pass
            elif key.fileobj is self._socket:
                self._accept_waiting_clients()
            else:
                self._advance(key.data)
        now = time.monotonic()
        for pending in list(self._pending.values()):
            if pending.deadline is not None and now >= pending.deadline:
                self._drop(
                    pending,
                    AuthenticationError(
                        f"client {pending.peer!r} did not complete the "
                        f"{'TLS and ' if self._ssl_context else ''}authentication handshake "
                        f"within {self._handshake_timeout} s"
                    ),
                )

    def _accept_waiting_clients(self) -> None:
        sock = self._socket
        assert sock is not None
        while len(self._pending) < MAX_PENDING_HANDSHAKES:
            try:
                client, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # ECONNABORTED and friends concern that client only.
                self._failures.append(exc)
                return
            if self._authkey is None and self._ssl_context is None:
                client.setblocking(True)
                pending = _PendingClient(client, peer, None, None, None)
                self._ready.append(pending)
                continue
            deadline = (
                None
                if self._handshake_timeout is None
                else time.monotonic() + self._handshake_timeout
            )
            try:
                pending = _PendingClient(client, peer, deadline, self._ssl_context, self._authkey)
            except (OSError, ValueError) as exc:
                client.close()
                self._failures.append(exc)
                continue
            self._pending[pending.sock.fileno()] = pending
            self._selector.register(pending.sock, selectors.EVENT_READ, pending)
            self._advance(pending)
        if self._listening_registered:
            # Full: leave further clients in the kernel backlog until a handshake ends.
            self._selector.unregister(sock)
            self._listening_registered = False

    def _advance(self, pending: _PendingClient) -> None:
        try:
            done = pending.advance()
        except AuthenticationError as exc:
            self._drop(pending, AuthenticationError(f"client {pending.peer!r}: {exc}"), exc)
            return
        except (OSError, ValueError) as exc:
            what = "TLS handshake" if not pending.tls_done else "authentication handshake"
            self._drop(
                pending,
                AuthenticationError(f"{what} with client {pending.peer!r} failed: {exc}"),
                exc,
            )
            return
        if done:
            self._forget(pending)
            self._ready.append(pending)
        else:
            events = selectors.EVENT_READ
            if pending.wants_write:
                events |= selectors.EVENT_WRITE
            self._selector.modify(pending.sock, events, pending)

    def _forget(self, pending: _PendingClient) -> None:
        self._pending.pop(pending.sock.fileno(), None)
        try:
            self._selector.unregister(pending.sock)
        except (KeyError, ValueError):
            pass
        if not self._listening_registered and self._socket is not None:
            self._selector.register(self._socket, selectors.EVENT_READ, None)
            self._listening_registered = True

    def _drop(
        self, pending: _PendingClient, error: BaseException, cause: Optional[BaseException] = None
    ) -> None:
        self._forget(pending)
        pending.close()
        error.__cause__ = cause
        self._failures.append(error)

    def _hand_over(self, pending: _PendingClient) -> Any:
        sock = pending.sock
        try:
            sock.setblocking(True)
            connection = _make_connection(
                sock, self._codec, self._max_message_size, pending.reader.peer_oob
            )
        except BaseException:
            sock.close()
            raise
        self._last_accepted = pending.peer
        return connection

    # -- the rest of the stdlib surface ----------------------------------------------
    def close(self) -> None:
        """Close the listening socket (and clients still in their handshake)."""
        sock = self._socket
        if sock is None:
            return
        self._closed = True
        try:
            self._wake_writer.send(b"x")
        except OSError:
            pass
        with self._accept_lock:
            self._socket = None
            for pending in list(self._pending.values()) + list(self._ready):
                pending.close()
            self._pending.clear()
            self._ready.clear()
            self._selector.close()
            self._wake_reader.close()
            self._wake_writer.close()
            try:
                sock.close()
            finally:
                if self._unlink is not None:
                    self._unlink()
                    self._unlink = None

    @property
    def address(self) -> Any:
        return self._address

    @property
    def last_accepted(self) -> Any:
        return self._last_accepted

    def fileno(self) -> int:
        """The listening socket's descriptor (readable when a client is waiting)."""
        if self._socket is None:
            raise OSError("listener is closed")
        return self._socket.fileno()

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._socket is None else "listening"
        return f"<hyperpipe.Listener {state} address={self._address!r} family={self._family}>"


def _unlink(path: Any) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def Client(
    address: Any,
    family: Optional[str] = None,
    authkey: Optional[bytes] = None,
    *,
    ssl_context: Optional[ssl.SSLContext] = None,
    codec: Any = "pickle",
    timeout: Optional[float] = None,
    max_message_size: Optional[int] = None,
    handshake_timeout: Optional[float] = _auth.DEFAULT_HANDSHAKE_TIMEOUT,
    server_hostname: Optional[str] = None,
) -> Any:
    """Connect to a Listener (hyperpipe's or the standard library's) and return a Connection.

    ``timeout`` bounds connect + TLS + authkey handshake together; ``handshake_timeout``
    bounds the handshake alone (so a key on this side only fails instead of waiting for
    a challenge that never comes). Both raise ``hyperpipe.TimeoutError``.
    ``server_hostname`` is checked against the server's certificate (default: the host
    of a TCP address).
    """
    family = family or address_type(address)
    _validate_family(family)
    _check_authkey(authkey)
    _check_ssl_context(ssl_context, server_side=False)
    _check_max_message_size(max_message_size)
    codec_obj = get_codec(codec)
    start = time.monotonic()
    deadline = None if timeout is None else start + max(0.0, timeout)

    def remaining() -> Optional[float]:
        return _auth._remaining(deadline, f"connecting to {address!r}")

    sock = socket.socket(getattr(socket, family))
    try:
        try:
            sock.settimeout(remaining())
            sock.connect(address)
            if ssl_context is not None:
                if server_hostname is None and family in ("AF_INET", "AF_INET6"):
                    server_hostname = address[0]
                sock.settimeout(remaining())
                sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname)
        except socket.timeout:
            raise HyperpipeTimeoutError(f"connecting to {address!r} timed out") from None
        peer_oob = False
        if authkey is not None:
            handshake_deadline = deadline
            if handshake_timeout is not None:
                limit = time.monotonic() + handshake_timeout
                handshake_deadline = limit if deadline is None else min(deadline, limit)
            try:
                peer_oob = bool(
                    _auth.run_on_socket(_auth.client_handshake(authkey), sock, handshake_deadline)
                )
            except HyperpipeTimeoutError:
                raise HyperpipeTimeoutError(
                    f"the authentication handshake with {address!r} did not complete in time "
                    "(does the Listener use an authkey?)"
                ) from None
        sock.settimeout(None)
        if authkey is None and _uses_default_pickle(codec_obj):
            codec_obj = _ChallengeGuard()
        return _make_connection(sock, codec_obj, max_message_size, peer_oob)
    except BaseException:
        sock.close()
        raise


def loopback_pair(
    family: str = "AF_INET",
    authkey: Optional[bytes] = None,
    *,
    stdlib: bool = False,
    timeout: float = 30.0,
    **options: Any,
) -> tuple[Any, Any]:
    """Two Connections joined through a Listener on 127.0.0.1 (or a Unix socket).

    For the benchmark and tests: ``stdlib=True`` builds the pair with
    ``multiprocessing.connection`` instead, for a same-run baseline. Plain (non-TLS)
    ends can be sent to child processes like ``Pipe()`` ends. ``options`` go to both
    hyperpipe sides (``codec``, ``max_message_size``, ``ssl_context`` is not supported
    here since the two sides need different contexts).
    """
    import multiprocessing.connection as mpc

    address: Any = ("127.0.0.1", 0) if family == "AF_INET" else None
    listener_type: Any = mpc.Listener if stdlib else Listener
    client_fn: Any = mpc.Client if stdlib else Client
    extra: dict = {} if stdlib else dict(options)
    with listener_type(address, family, 1, authkey, **extra) as listener:
        accepted: list[Any] = []
        failure: list[BaseException] = []

        def accept() -> None:
            try:
                accepted.append(listener.accept() if stdlib else listener.accept(timeout=timeout))
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        client_extra = {} if stdlib else dict(extra, timeout=timeout)
        client = client_fn(listener.address, family, authkey, **client_extra)
        thread.join(timeout)
        if failure or not accepted:
            client.close()
            raise failure[0] if failure else HyperpipeTimeoutError("loopback accept timed out")
        return accepted[0], client
