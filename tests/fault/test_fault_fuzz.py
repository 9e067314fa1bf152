"""Property-based fuzzing of the socket wire: frames after the handshake, and the handshake.

Frames: valid frames, evil headers (negative, 2**31 - 1, 2**62 behind the long-length
escape...), garbage, then a mutation (cut, flipped byte, inserted bytes), written in random
chunks into the raw end of a socketpair whose other end is a ``hyperpipe.Connection``. A
reference parser of the standard library's format says what must come out: exactly the
whole messages it finds, then ``PeerClosedError`` (an ``EOFError``) at a clean end,
``ProtocolError`` (an ``OSError``) for an impossible header, ``MessageTooLongError`` (the
stdlib's ``OSError("bad message length")``) for one over ``maxlength``, and for a stream cut
inside a frame ``EOFError`` or ``ProtocolError`` (the strict form is
``test_end_of_file_inside_a_frame``). Never a hang (every receive has a timeout), never
more memory than the bytes that arrived justify.

Handshake: replies to a ``Listener``'s challenge (the right answer, mutated or not, and
arbitrary bytes) and challenges to a ``Client``: each ends in ``AuthenticationError`` for
that connection alone, and the Listener serves a good client afterwards.

Inputs are never unpickled (``recv`` of arbitrary bytes could run arbitrary code).
"""

from __future__ import annotations

import dataclasses
import hmac
import socket
import struct
import threading
import tracemalloc
from typing import Any, Optional

import pytest
from fault_helpers import COUNTS, SEED, STEP_TIMEOUT

import hyperpipe

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")
#: Above what arrived, a receive may commit at most this much memory for a frame.
ALLOCATION_SLACK = 32 << 20
RECV_TIMEOUT = 5.0

FAST = {"frames": 60, "handshake": 25}
FULL = {"frames": 20000, "handshake": 2000}


def _settings(examples: int) -> Any:
    return hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )


# -- the frame stream ------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    return _SHORT.pack(len(payload)) + payload


def _long_frame(payload: bytes) -> bytes:
    return _SHORT.pack(-1) + _LONG.pack(len(payload)) + payload


_payloads = st.binary(max_size=300)
_pieces = st.one_of(
    _payloads.map(_frame),
    _payloads.map(_long_frame),
    st.integers(-(2**31), 2**31 - 1).map(_SHORT.pack),  # a bare header
    st.integers(0, 2**64 - 1).map(lambda n: _SHORT.pack(-1) + _LONG.pack(n)),
    st.sampled_from([2**31 - 1, 2**62, 2**63, 2**64 - 1]).map(lambda n: _SHORT.pack(-1) + _LONG.pack(n)),
    st.binary(max_size=64),  # garbage
)


@st.composite
def wire_streams(draw: Any) -> bytes:
    stream = bytearray(b"".join(draw(st.lists(_pieces, max_size=8))))
    mutation = draw(st.sampled_from(["none", "cut", "flip", "insert"]))
    if stream and mutation != "none":
        at = draw(st.integers(0, len(stream) - 1))
        if mutation == "cut":
            del stream[at:]
        elif mutation == "flip":
            stream[at] ^= 1 << draw(st.integers(0, 7))
        else:
            stream[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(stream)


def expected_outcome(stream: bytes, maxlength: Optional[int]) -> tuple[list[bytes], str]:
    """The standard library's reading of ``stream``: whole messages, then how it ends."""
    messages: list[bytes] = []
    pos = 0
    while True:
        if pos == len(stream):
            return messages, "end"
        if len(stream) - pos < _SHORT.size:
            return messages, "cut"
        (size,) = _SHORT.unpack_from(stream, pos)
        pos += _SHORT.size
        if size == -1:
            if len(stream) - pos < _LONG.size:
                return messages, "cut"
            (size,) = _LONG.unpack_from(stream, pos)
            pos += _LONG.size
        elif size < 0:
            return messages, "invalid"
        if maxlength is not None and size > maxlength:
            return messages, "too long"
        if len(stream) - pos < size:
            return messages, "cut"
        messages.append(stream[pos : pos + size])
        pos += size


#: What may end each kind of stream (the cut case: EOFError once fixed, see the module doc).
ENDINGS: dict[str, tuple[type, ...]] = {
    "end": (hyperpipe.PeerClosedError,),
    "cut": (EOFError, hyperpipe.ProtocolError),
    "invalid": (hyperpipe.ProtocolError,),
    "too long": (hyperpipe.MessageTooLongError,),
}


def _feed(stream: bytes, chunks: list[int]) -> tuple[Any, threading.Thread]:
    """A Connection over a socketpair whose raw end writes ``stream`` in chunks, then closes."""
    raw, ours = socket.socketpair()
    conn: hyperpipe.Connection[Any, Any] = hyperpipe.Connection(ours.detach())

    def write() -> None:
        with raw:
            view = memoryview(stream)
            try:
                for size in chunks:
                    raw.sendall(view[:size])
                    view = view[size:]
                raw.sendall(view)
            except BrokenPipeError:  # the receiver stopped at a bad header and closed
                pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return conn, writer


def _receive_all(conn: Any, how: str, maxlength: Optional[int], into_size: int) -> tuple[list[bytes], BaseException]:
    received = []
    while True:
        try:
            if how == "recv_bytes_into":
                buf = bytearray(into_size)
                try:
                    received.append(bytes(buf[: conn.recv_bytes_into(buf, timeout=RECV_TIMEOUT)]))
                except hyperpipe.BufferTooShort as exc:
                    received.append(exc.args[0])
                continue
            if how == "poll, then recv_bytes":
                assert conn.poll(RECV_TIMEOUT), "poll() timed out with input or EOF pending"
            received.append(conn.recv_bytes(maxlength, timeout=RECV_TIMEOUT))
        except hyperpipe.TimeoutError:
            raise AssertionError(f"a receive hung (no result in {RECV_TIMEOUT} s)") from None
        except (EOFError, OSError) as exc:
            return received, exc


def _check_stream(stream: bytes, chunks: list[int], how: str, maxlength: Optional[int], into_size: int) -> None:
    if how != "recv_bytes":
        maxlength = None
    expected, ending = expected_outcome(stream, maxlength)
    conn, writer = _feed(stream, chunks)
    tracemalloc.start()
    try:
        received, error = _receive_all(conn, how, maxlength, into_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        conn.close()
        writer.join(STEP_TIMEOUT)
    assert received == expected, f"messages {received!r} instead of {expected!r}"
    assert isinstance(error, ENDINGS[ending]), f"{ending} stream ended with {error!r}"
    assert peak < ALLOCATION_SLACK + 4 * len(stream), f"{peak} bytes allocated for {len(stream)} received"
    COUNTS["fuzzed frame streams"] += 1


def _fuzz_frames(examples: int) -> None:
    @_settings(examples)
    @hypothesis.seed(SEED)
    @hypothesis.given(
        stream=wire_streams(),
        chunks=st.lists(st.integers(1, 64), max_size=6),
        how=st.sampled_from(["recv_bytes", "recv_bytes_into", "poll, then recv_bytes"]),
        maxlength=st.one_of(st.none(), st.integers(0, 400)),
        into_size=st.integers(0, 320),
    )
    def check(stream: bytes, chunks: list[int], how: str, maxlength: Optional[int], into_size: int) -> None:
        _check_stream(stream, chunks, how, maxlength, into_size)

    check()


def test_fuzz_frames_fast() -> None:
    _fuzz_frames(FAST["frames"])


@pytest.mark.stress
def test_fuzz_frames_full() -> None:
    _fuzz_frames(FULL["frames"])


@pytest.mark.parametrize(
    "tail",
    [
        _SHORT.pack(10)[:2],  # inside the header
        _SHORT.pack(10) + b"abc",  # inside the body
        _SHORT.pack(-1) + _LONG.pack(2**62)[:5],  # inside the long header
        _SHORT.pack(-1) + _LONG.pack(32 << 20) + b"x" * 100,  # 32 MiB announced, 100 sent
    ],
    ids=["header", "body", "long-header", "long-body"],
)
def test_end_of_file_inside_a_frame(tail: bytes) -> None:
    """A peer gone mid-frame: every whole message, then an error that is EOFError and OSError."""
    whole = [b"first", b"second" * 100]
    conn, writer = _feed(b"".join(map(_frame, whole)) + tail, [])
    try:
        assert [conn.recv_bytes(timeout=RECV_TIMEOUT) for _ in whole] == whole
        with pytest.raises(EOFError) as info:
            conn.recv_bytes(timeout=RECV_TIMEOUT)
        assert isinstance(info.value, OSError)
    finally:
        conn.close()
        writer.join(STEP_TIMEOUT)


def test_a_length_no_memory_can_hold_is_refused_up_front() -> None:
    """2**62 bytes announced: a ProtocolError before anything is allocated or read (the
    stdlib tries to allocate it and raises MemoryError), after every whole message."""
    whole = [b"first"]
    tail = _SHORT.pack(-1) + _LONG.pack(2**62) + b"x" * 100
    conn, writer = _feed(b"".join(map(_frame, whole)) + tail, [])
    try:
        assert conn.recv_bytes(timeout=RECV_TIMEOUT) == whole[0]
        with pytest.raises(hyperpipe.ProtocolError, match="cannot reserve"):
            conn.recv_bytes(timeout=RECV_TIMEOUT)
    finally:
        conn.close()
        writer.join(STEP_TIMEOUT)


# -- the handshake ---------------------------------------------------------------------

KEY = b"fault matrix key"


def _read_frame(sock: socket.socket) -> bytes:
    """One frame, or ``b""`` if the peer hangs up first."""
    header = _recv_exactly(sock, _SHORT.size)
    return _recv_exactly(sock, _SHORT.unpack(header)[0]) if len(header) == _SHORT.size else b""


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return data
        data += chunk
    return data


def _send_and_hang_up(sock: socket.socket, data: bytes) -> None:
    """Send a wrong answer; the server may hang up before reading it all (a reset here)."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        verdict = _read_frame(sock)
    except OSError:  # ECONNRESET, EPIPE, ENOTCONN
        return
    assert verdict in (b"#FAILURE#", b""), f"{data!r} got {verdict!r}"


def _right_answer(challenge: bytes) -> bytes:
    """What a client holding KEY answers to a modern challenge (``#CHALLENGE#{digest}...``)."""
    message = challenge[len(b"#CHALLENGE#") :]
    digest = message[1 : message.index(b"}")].decode()
    return b"{%s}%s" % (digest.encode(), hmac.new(KEY, message, digest).digest())


@dataclasses.dataclass
class Reply:
    """An answer to a challenge: the right one (framed), mutated or not, or garbage;
    ``extend`` is the right one followed by ``extra`` (the test sends them in turn)."""

    kind: str
    at: int
    extra: bytes
    header: int

    def __call__(self, challenge: bytes) -> bytes:
        framed = _frame(_right_answer(challenge))
        if self.kind == "cut":
            return framed[: self.at % len(framed)]
        if self.kind == "flip":
            mutated = bytearray(framed)
            mutated[self.at % len(framed)] ^= 0x20
            return bytes(mutated)
        if self.kind == "garbage":
            return self.extra
        if self.kind == "header":
            return _SHORT.pack(self.header) + self.extra
        return framed


replies = st.builds(
    Reply,
    kind=st.sampled_from(["right", "cut", "flip", "extend", "garbage", "header"]),
    at=st.integers(0, 400),
    extra=st.binary(min_size=1, max_size=300),
    header=st.integers(-(2**31), 2**31 - 1),
)


def _fuzz_listener(examples: int) -> None:
    with hyperpipe.Listener(("127.0.0.1", 0), authkey=KEY, handshake_timeout=STEP_TIMEOUT) as listener:

        @_settings(examples)
        @hypothesis.seed(SEED)
        @hypothesis.given(reply=replies)
        def check(reply: Reply) -> None:
            outcome: list[BaseException] = []

            def accept() -> None:  # accept() is what drives the handshake
                try:
                    listener.accept(timeout=STEP_TIMEOUT).close()
                except Exception as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=accept, daemon=True)
            thread.start()
            try:
                with socket.create_connection(listener.address, timeout=STEP_TIMEOUT) as sock:
                    challenge = _read_frame(sock)
                    if reply.kind in ("right", "extend"):
                        sock.sendall(_frame(_right_answer(challenge)))
                        assert _read_frame(sock) == b"#WELCOME#", "the right answer was refused"
                        if reply.kind == "extend":
                            sock.sendall(reply.extra)  # read as the next frame
                    else:
                        _send_and_hang_up(sock, reply(challenge))
            finally:
                thread.join(STEP_TIMEOUT)
            assert not thread.is_alive(), "accept() hung"
            assert len(outcome) == 1 and isinstance(outcome[0], hyperpipe.AuthenticationError), outcome
            COUNTS["fuzzed handshakes"] += 1

        check()
        served: list[Any] = []
        thread = threading.Thread(target=lambda: served.append(listener.accept(timeout=STEP_TIMEOUT)))
        thread.start()
        with hyperpipe.Client(listener.address, authkey=KEY, timeout=STEP_TIMEOUT) as client:
            thread.join(STEP_TIMEOUT)
            with served[0]:
                client.send("still serving")
                assert served[0].recv(timeout=STEP_TIMEOUT) == "still serving"


def _fuzz_client(examples: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(STEP_TIMEOUT)

        @_settings(examples)
        @hypothesis.seed(SEED)
        @hypothesis.given(challenge=st.one_of(wire_streams(), st.binary(max_size=300).map(lambda b: _frame(b"#CHALLENGE#" + b))))
        def check(challenge: bytes) -> None:
            def serve() -> None:
                conn, _ = server.accept()
                with conn:
                    try:
                        conn.sendall(challenge)
                        conn.shutdown(socket.SHUT_WR)
                        while conn.recv(4096):  # until the client hangs up
                            pass
                    except OSError:  # it hung up with our bytes unread: a reset
                        pass

            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            try:
                with pytest.raises(hyperpipe.AuthenticationError):
                    hyperpipe.Client(server.getsockname(), authkey=KEY, timeout=STEP_TIMEOUT)
            finally:
                thread.join(STEP_TIMEOUT)
            assert not thread.is_alive(), "the raw server never saw the client hang up"
            COUNTS["fuzzed handshakes"] += 1

        check()


def test_fuzz_handshake_fast() -> None:
    _fuzz_listener(FAST["handshake"])
    _fuzz_client(FAST["handshake"])


@pytest.mark.stress
def test_fuzz_handshake_full() -> None:
    _fuzz_listener(FULL["handshake"])
    _fuzz_client(FULL["handshake"])
