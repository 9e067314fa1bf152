"""The authkey handshake, wire-compatible with every ``multiprocessing.connection``.

Two protocols are spoken and told apart on the wire, exactly as CPython 3.12+ does:

- **modern** (3.12+): the challenge is ``#CHALLENGE#{sha256}`` + 40 random bytes and the
  answer is ``{digest}`` + HMAC(authkey, whole challenge) — the MAC covers the digest
  name, so a man in the middle cannot downgrade it.
- **legacy** (3.11 and older): a 20-byte challenge and a raw 16-byte HMAC-MD5 answer.
  A legacy peer answers our modern challenge with HMAC-MD5 over all of it, which we
  accept (16 bytes is no valid modern length); a 20-byte challenge from a legacy peer
  gets a raw HMAC-MD5 answer.

Hardening over the 3.11 code: every handshake frame is bounded (256 bytes, checked from
the header before anything is read), digests are compared with ``hmac.compare_digest``,
no ``assert`` guards the protocol, and every read and write has a deadline.

**Out-of-band frames.** Each hyperpipe Listener/Client (and ``hyperpipe.asyncio``) side
appends ``OOB_TAG`` to the random part of the challenge it sends (``deliver_challenge``,
which may run on any connection object, does not). A standard-library peer only MACs the
challenge (any length from 20 bytes up is fine for it), so it never notices; a hyperpipe
peer that finds the tag in the challenge it answered knows the other side reads
hyperpipe's out-of-band frames. The handshake generators return that finding
(``True``/``False``), and the drivers pass it on.

The protocol itself is written once, as generators that do no I/O ("sans-IO"): they
yield ``bytes`` to send, or ``None`` to ask for the next frame, which the driver sends
back in. Three drivers run them: ``run_on_connection`` (any object with
``send_bytes``/``recv_bytes``, the standard-library API), ``run_on_socket`` (a blocking
socket, with a deadline; used by ``Client``) and ``HandshakeReader`` plus the accept loop
of ``Listener`` (non-blocking, so one silent client cannot hold up the others).
"""

from __future__ import annotations

import hmac
import os
import socket
import time
from typing import Any, Generator, Optional

from . import _framing
from .errors import AuthenticationError, MessageTooLongError, ProtocolError
from .errors import TimeoutError as HyperpipeTimeoutError

__all__ = [
    "deliver_challenge",
    "answer_challenge",
    "server_handshake",
    "client_handshake",
    "run_on_connection",
    "run_on_socket",
    "HandshakeReader",
    "MAX_HANDSHAKE_FRAME",
    "DEFAULT_HANDSHAKE_TIMEOUT",
]

CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
MESSAGE_LENGTH = 40  # random bytes in a modern challenge; must be > 20
#: Appended to our challenges: "this side reads hyperpipe's out-of-band frames" (docs/wire.md).
OOB_TAG = b"|hyperpipe-oob/1"

#: No handshake frame may be longer (the standard library's ``recv_bytes(256)``).
MAX_HANDSHAKE_FRAME = 256
#: Seconds a peer gets to finish the handshake (the stdlib's CONNECTION_TIMEOUT is 20).
DEFAULT_HANDSHAKE_TIMEOUT = 20.0
DEFAULT_DIGEST = "sha256"

ALLOWED_DIGESTS = frozenset({b"md5", b"sha256", b"sha384", b"sha3_256", b"sha3_384"})
_MAX_DIGEST_NAME = max(len(name) for name in ALLOWED_DIGESTS)
# A legacy challenge is 20 bytes and a legacy answer 16: no modern message has either length.
_LEGACY_CHALLENGE_LENGTH = 20
_MD5_DIGEST_LENGTH = 16
_LEGACY_LENGTHS = (_LEGACY_CHALLENGE_LENGTH, _MD5_DIGEST_LENGTH)

# What the generators yield: bytes to send, or None to receive one frame; they return
# whether the peer announced out-of-band frames (deliver_steps returns None).
Step = Generator[Optional[bytes], Optional[bytes], Optional[bool]]


def check_authkey(authkey: Any) -> None:
    if not isinstance(authkey, bytes):
        raise ValueError(f"Authkey must be bytes, not {type(authkey)!s}")


def _digest_name_and_payload(message: bytes) -> tuple[str, bytes]:
    """``("", message)`` for the legacy protocol, else ``(digest_name, payload)``."""
    if len(message) in _LEGACY_LENGTHS:
        return "", message
    if message.startswith(b"{"):
        curly = message.find(b"}", 1, _MAX_DIGEST_NAME + 2)
        if curly > 0:
            digest = message[1:curly]
            if digest in ALLOWED_DIGESTS:
                return digest.decode("ascii"), message[curly + 1 :]
    raise AuthenticationError(
        f"unsupported message length ({len(message)} bytes), missing digest prefix "
        "or unsupported digest in the authentication handshake"
    )


def _create_response(authkey: bytes, message: bytes) -> bytes:
    digest_name = _digest_name_and_payload(message)[0]
    if not digest_name:
        try:
            return hmac.new(authkey, message, "md5").digest()
        except ValueError:  # no MD5 (FIPS mode): a legacy peer will refuse this
            digest_name = DEFAULT_DIGEST
    mac = hmac.new(authkey, message, digest_name).digest()
    return b"{%s}%s" % (digest_name.encode("ascii"), mac)


def _verify_response(authkey: bytes, message: bytes, response: bytes) -> None:
    digest_name, mac = _digest_name_and_payload(response)
    digest_name = digest_name or "md5"
    try:
        expected = hmac.new(authkey, message, digest_name).digest()
    except ValueError:
        raise AuthenticationError(f"digest {digest_name!r} is not available here") from None
    if len(expected) != len(mac):
        raise AuthenticationError(
            f"expected a {digest_name!r} digest of {len(expected)} bytes, got {len(mac)}"
        )
    if not hmac.compare_digest(expected, mac):
        raise AuthenticationError("digest received was wrong")


# -- the protocol, without I/O ---------------------------------------------------------


def deliver_steps(
    authkey: bytes, digest_name: str = DEFAULT_DIGEST, *, announce: bool = False
) -> Step:
    """Challenge the peer and check its answer (the serving side speaks first).

    ``announce``: append ``OOB_TAG`` (only where our SocketTransport reads the connection).
    """
    if digest_name.encode("ascii") not in ALLOWED_DIGESTS:
        raise ValueError(f"unsupported digest {digest_name!r}")
    tag = OOB_TAG if announce else b""
    message = b"{%s}%s%s" % (digest_name.encode("ascii"), os.urandom(MESSAGE_LENGTH), tag)
    yield CHALLENGE + message
    response = yield None
    assert response is not None
    try:
        _verify_response(authkey, message, response)
    except AuthenticationError:
        yield FAILURE
        raise
    yield WELCOME
    return None


def answer_steps(authkey: bytes) -> Step:
    """Answer the peer's challenge and read its verdict; True if the peer is hyperpipe and
    reads out-of-band frames (its challenge carried ``OOB_TAG``)."""
    message = yield None
    assert message is not None
    if not message.startswith(CHALLENGE):
        raise AuthenticationError(
            "protocol error: expected an authentication challenge "
            f"(the peer sent {message[:20]!r}...; does it use an authkey?)"
        )
    message = message[len(CHALLENGE) :]
    if len(message) < _LEGACY_CHALLENGE_LENGTH:
        raise AuthenticationError(f"challenge too short: {len(message)} bytes")
    yield _create_response(authkey, message)
    verdict = yield None
    if verdict != WELCOME:
        raise AuthenticationError("digest sent was rejected")
    return message.endswith(OOB_TAG)


def server_handshake(authkey: bytes, digest_name: str = DEFAULT_DIGEST) -> Step:
    """What ``Listener.accept`` runs: challenge, then answer (mutual authentication)."""
    yield from deliver_steps(authkey, digest_name, announce=True)
    return (yield from answer_steps(authkey))


def client_handshake(authkey: bytes, digest_name: str = DEFAULT_DIGEST) -> Step:
    """What ``Client`` runs: answer, then challenge."""
    peer_oob = yield from answer_steps(authkey)
    yield from deliver_steps(authkey, digest_name, announce=True)
    return peer_oob


# -- framing (the socket transport's, from _framing) ------------------------------------


def encode_frame(payload: bytes) -> bytes:
    """One stdlib frame; handshake frames are always short."""
    return _framing.header(len(payload)) + payload


def handshake_frame_reader() -> _framing.FrameReader:
    """Reads stdlib frames of at most ``MAX_HANDSHAKE_FRAME`` bytes, exactly."""
    return _framing.FrameReader(MAX_HANDSHAKE_FRAME, oob=False)


def advance_handshake_reader(reader: _framing.FrameReader, n: int) -> Optional[bytes]:
    """``reader.advance(n)`` with framing errors as ``AuthenticationError``."""
    try:
        frame = reader.advance(n)
    except (MessageTooLongError, ProtocolError) as exc:
        raise AuthenticationError(
            f"handshake message refused ({exc}; at most {MAX_HANDSHAKE_FRAME} bytes); "
            "is the peer using an authkey?"
        ) from None
    return None if frame is None else bytes(frame)


# -- driver 1: a stdlib-style connection object ----------------------------------------


def run_on_connection(steps: Step, connection: Any) -> Optional[bool]:
    """Run a handshake over ``connection.send_bytes`` / ``connection.recv_bytes(256)``;
    returns what the steps return."""
    reply: Optional[bytes] = None
    try:
        request = steps.send(None)
        while True:
            if request is None:
                try:
                    reply = connection.recv_bytes(MAX_HANDSHAKE_FRAME)
                except EOFError:
                    raise AuthenticationError(
                        "the peer closed the connection during the authentication handshake"
                    ) from None
            else:
                connection.send_bytes(request)
                reply = None
            request = steps.send(reply)
    except StopIteration as done:
        return done.value


def deliver_challenge(connection: Any, authkey: bytes, digest_name: str = DEFAULT_DIGEST) -> None:
    """Same as ``multiprocessing.connection.deliver_challenge`` (3.12+), hardened."""
    check_authkey(authkey)
    run_on_connection(deliver_steps(authkey, digest_name), connection)


def answer_challenge(connection: Any, authkey: bytes) -> None:
    """Same as ``multiprocessing.connection.answer_challenge`` (3.12+), hardened."""
    check_authkey(authkey)
    run_on_connection(answer_steps(authkey), connection)


# -- driver 2: a blocking socket with a deadline ----------------------------------------


def _remaining(deadline: Optional[float], what: str) -> Optional[float]:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise HyperpipeTimeoutError(f"{what} timed out")
    return left


def _recv_handshake_frame(sock: socket.socket, deadline: Optional[float], what: str) -> bytes:
    reader = handshake_frame_reader()
    while True:
        sock.settimeout(_remaining(deadline, what))
        try:
            n = sock.recv_into(reader.target())
        except socket.timeout:
            raise HyperpipeTimeoutError(f"{what} timed out") from None
        if not n:
            raise AuthenticationError(
                f"the peer closed the connection during the {what} "
                "(a wrong key, or an authkey on one side only?)"
            )
        frame = advance_handshake_reader(reader, n)
        if frame is not None:
            return frame


def run_on_socket(steps: Step, sock: socket.socket, deadline: Optional[float]) -> Optional[bool]:
    """Run a handshake on a connected socket; ``deadline`` bounds all of it.

    Returns what the steps return (whether the peer reads out-of-band frames). Leaves the
    socket blocking (no timeout). Raises ``AuthenticationError`` on a protocol failure and
    ``hyperpipe.TimeoutError`` when the deadline passes.
    """
    what = "authentication handshake"
    try:
        request = steps.send(None)
        while True:
            if request is None:
                reply: Optional[bytes] = _recv_handshake_frame(sock, deadline, what)
            else:
                sock.settimeout(_remaining(deadline, what))
                try:
                    sock.sendall(encode_frame(request))
                except socket.timeout:
                    raise HyperpipeTimeoutError(f"{what} timed out") from None
                reply = None
            request = steps.send(reply)
    except StopIteration as done:
        return done.value
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass


# -- driver 3: non-blocking, for Listener.accept ----------------------------------------


class HandshakeReader:
    """Drives handshake steps on a non-blocking socket as far as it can without blocking.

    ``advance()`` returns True once the handshake is complete, False when it must wait
    for the socket (``wants_write`` says for which direction) and raises when it fails.
    Reads are exact (header, then at most 256 bytes of body), so nothing that follows
    the handshake is consumed.
    """

    def __init__(self, sock: socket.socket, steps: Optional[Step]) -> None:
        self._sock = sock
        self._steps = steps
        self._outgoing = b""
        self._frames = handshake_frame_reader()
        self._waiting_for_frame = False
        self.wants_write = False
        self._done = steps is None
        self._started = False
        #: What the steps returned: whether the peer reads out-of-band frames.
        self.peer_oob = False

    def advance(self) -> bool:
        if self._done:
            return True
        if not self._started:
            self._started = True
            self._feed(None)
        while not self._done:
            if self._outgoing:
                if not self._flush():
                    return False
                self._feed(None)
                continue
            if self._waiting_for_frame:
                frame = self._read_frame()
                if frame is None:
                    return False
                self._feed(frame)
        return True

    def _feed(self, reply: Optional[bytes]) -> None:
        assert self._steps is not None
        try:
            request = self._steps.send(reply)
        except StopIteration as done:
            self.peer_oob = bool(done.value)
            self._done = True
            self._waiting_for_frame = False
            return
        if request is None:
            self._waiting_for_frame = True
        else:
            self._waiting_for_frame = False
            self._outgoing = encode_frame(request)

    def _flush(self) -> bool:
        self.wants_write = False
        while self._outgoing:
            try:
                sent = self._sock.send(self._outgoing)
            except (BlockingIOError, InterruptedError):
                self.wants_write = True
                return False
            except OSError as exc:
                if _ssl_wants(exc) == "write":
                    self.wants_write = True
                    return False
                if _ssl_wants(exc) == "read":
                    return False
                raise
            self._outgoing = self._outgoing[sent:]
        return True

    def _read_frame(self) -> Optional[bytes]:
        while True:
            try:
                n = self._sock.recv_into(self._frames.target())
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                if _ssl_wants(exc) == "write":
                    self.wants_write = True
                    return None
                if _ssl_wants(exc) == "read":
                    return None
                raise
            if not n:
                raise AuthenticationError(
                    "the peer closed the connection during the authentication handshake"
                )
            frame = advance_handshake_reader(self._frames, n)
            if frame is not None:
                return frame


def _ssl_wants(exc: BaseException) -> Optional[str]:
    """'read'/'write' for the ssl module's want-read/want-write errors, else None."""
    try:
        import ssl
    except ImportError:  # pragma: no cover - Python built without ssl
        return None
    if isinstance(exc, ssl.SSLWantReadError):
        return "read"
    if isinstance(exc, ssl.SSLWantWriteError):
        return "write"
    return None
