"""The authkey handshake on its own: protocol detection, hardening, bounded reads, deadlines."""

from __future__ import annotations

import hmac
import multiprocessing.connection as mpc
import socket
import struct
import threading
import time
from typing import Any, Callable

import pytest

import hyperpipe
from hyperpipe import _auth

KEY = b"the right key"


def run_pair(server: Callable[[Any], None], client: Callable[[Any], None]) -> tuple[Any, Any]:
    """Run ``server(conn_a)`` in a thread and ``client(conn_b)`` here over a stdlib Pipe.

    Returns (server_exception, client_exception), either None.
    """
    a, b = mpc.Pipe()
    outcome: dict[str, Any] = {"server": None, "client": None}

    def serve() -> None:
        try:
            server(a)
        except BaseException as exc:
            outcome["server"] = exc
        finally:
            a.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client(b)
    except BaseException as exc:
        outcome["client"] = exc
    finally:
        b.close()
    thread.join(10)
    assert not thread.is_alive(), "server side of the handshake hung"
    return outcome["server"], outcome["client"]


def hp_server(key: bytes, digest: str = "sha256") -> Callable[[Any], None]:
    def run(conn: Any) -> None:
        _auth.deliver_challenge(conn, key, digest)
        _auth.answer_challenge(conn, key)

    return run


def hp_client(key: bytes) -> Callable[[Any], None]:
    def run(conn: Any) -> None:
        _auth.answer_challenge(conn, key)
        _auth.deliver_challenge(conn, key)

    return run


def legacy_server(key: bytes) -> Callable[[Any], None]:
    # Python 3.11's own functions: the legacy HMAC-MD5 protocol.
    def run(conn: Any) -> None:
        mpc.deliver_challenge(conn, key)
        mpc.answer_challenge(conn, key)

    return run


def legacy_client(key: bytes) -> Callable[[Any], None]:
    def run(conn: Any) -> None:
        mpc.answer_challenge(conn, key)
        mpc.deliver_challenge(conn, key)

    return run


@pytest.mark.parametrize("digest", sorted(d.decode() for d in _auth.ALLOWED_DIGESTS))
def test_modern_handshake_with_each_digest(digest: str) -> None:
    assert run_pair(hp_server(KEY, digest), hp_client(KEY)) == (None, None)


@pytest.mark.parametrize("server_kind", ["hyperpipe", "legacy"])
@pytest.mark.parametrize("client_kind", ["hyperpipe", "legacy"])
def test_modern_and_legacy_peers_authenticate_each_other(server_kind: str, client_kind: str) -> None:
    server = hp_server(KEY) if server_kind == "hyperpipe" else legacy_server(KEY)
    client = hp_client(KEY) if client_kind == "hyperpipe" else legacy_client(KEY)
    assert run_pair(server, client) == (None, None)


@pytest.mark.parametrize(
    "server_kind, client_kind",
    [("hyperpipe", "hyperpipe"), ("hyperpipe", "legacy"), ("legacy", "hyperpipe")],
)
def test_wrong_key_fails_on_both_sides(server_kind: str, client_kind: str) -> None:
    server = hp_server(KEY) if server_kind == "hyperpipe" else legacy_server(KEY)
    client = hp_client(b"wrong") if client_kind == "hyperpipe" else legacy_client(b"wrong")
    server_error, client_error = run_pair(server, client)
    assert isinstance(server_error, mpc.AuthenticationError)
    assert isinstance(client_error, mpc.AuthenticationError)
    if server_kind == "hyperpipe":
        assert isinstance(server_error, hyperpipe.AuthenticationError)
    if client_kind == "hyperpipe":
        assert isinstance(client_error, hyperpipe.AuthenticationError)


def test_modern_challenge_has_digest_prefix_and_answer_is_macd_over_it() -> None:
    a, b = mpc.Pipe()
    with a, b:
        server_errors: list[BaseException] = []

        def serve() -> None:
            try:
                hp_server(KEY)(a)
            except BaseException as exc:
                server_errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        challenge = b.recv_bytes(256)
        assert challenge.startswith(b"#CHALLENGE#{sha256}")
        message = challenge[len(b"#CHALLENGE#") :]
        assert len(message) == len(b"{sha256}") + _auth.MESSAGE_LENGTH
        mac = hmac.new(KEY, message, "sha256").digest()
        b.send_bytes(b"{sha256}" + mac)
        assert b.recv_bytes(256) == b"#WELCOME#"
        b.close()  # the server's answer_challenge step then fails on EOF
        thread.join(10)
        assert not thread.is_alive()
        assert len(server_errors) == 1
        assert isinstance(server_errors[0], hyperpipe.AuthenticationError)
        assert "closed the connection" in str(server_errors[0])


def test_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = hmac.compare_digest

    def spy(x: Any, y: Any) -> bool:
        calls.append((x, y))
        return real(x, y)

    monkeypatch.setattr(_auth.hmac, "compare_digest", spy)
    assert run_pair(hp_server(KEY), hp_client(KEY)) == (None, None)
    assert len(calls) == 2  # one verification on each side


@pytest.mark.parametrize(
    "response",
    [
        b"",
        b"x" * 15,
        b"{sha1}" + b"x" * 20,  # a digest that is not allowed
        b"{sha256}" + b"x" * 31,  # wrong MAC length
        b"{sha256" + b"x" * 40,  # no closing brace
        b"\x80\x04\x95" + b"pickle-ish" * 10,
    ],
)
def test_malformed_responses_are_refused(response: bytes) -> None:
    def client(conn: Any) -> None:
        conn.recv_bytes(256)
        conn.send_bytes(response)
        assert conn.recv_bytes(256) == b"#FAILURE#"

    server_error, client_error = run_pair(hp_server(KEY), client)
    assert isinstance(server_error, hyperpipe.AuthenticationError)
    assert client_error is None


def test_a_message_that_is_not_a_challenge_is_refused() -> None:
    def server(conn: Any) -> None:
        conn.send(("hello", "world"))  # user data, as a server without a key would send

    server_error, client_error = run_pair(server, hp_client(KEY))
    assert server_error is None
    assert isinstance(client_error, hyperpipe.AuthenticationError)
    assert "expected an authentication challenge" in str(client_error)


def test_short_challenge_is_refused() -> None:
    def server(conn: Any) -> None:
        conn.send_bytes(b"#CHALLENGE#" + b"x" * 19)

    server_error, client_error = run_pair(server, hp_client(KEY))
    assert isinstance(client_error, hyperpipe.AuthenticationError)
    assert "too short" in str(client_error)


def test_unknown_digest_in_challenge_is_refused() -> None:
    def server(conn: Any) -> None:
        conn.send_bytes(b"#CHALLENGE#{whirlpool}" + b"x" * 40)

    _, client_error = run_pair(server, hp_client(KEY))
    assert isinstance(client_error, hyperpipe.AuthenticationError)


def test_deliver_challenge_rejects_unknown_digest_name_and_non_bytes_key() -> None:
    a, b = mpc.Pipe()
    with a, b:
        with pytest.raises(ValueError):
            _auth.deliver_challenge(a, KEY, "sha1")
        with pytest.raises(ValueError):
            _auth.deliver_challenge(a, "text key")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            _auth.answer_challenge(a, None)  # type: ignore[arg-type]
        assert not b.poll(0)  # nothing was sent


# -- the socket drivers: bounded reads and deadlines ----------------------------------


def test_socket_driver_refuses_a_huge_length_before_reading_it() -> None:
    a, b = socket.socketpair()
    with a, b:
        # header -1 then an 8-byte length of 2**62: refused from the header alone
        a.sendall(struct.pack("!i", -1) + struct.pack("!Q", 2**62) + b"tail")
        with pytest.raises(hyperpipe.AuthenticationError, match="at most 256"):
            _auth.run_on_socket(_auth.client_handshake(KEY), b, time.monotonic() + 5)
        assert b.recv(16) == b"tail"  # the body was never read


@pytest.mark.parametrize("length", [257, 2**31 - 1, -2])
def test_socket_driver_refuses_out_of_bounds_short_lengths(length: int) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack("!i", length))
        with pytest.raises(hyperpipe.AuthenticationError):
            _auth.run_on_socket(_auth.client_handshake(KEY), b, time.monotonic() + 5)


def test_socket_driver_deadline_covers_a_silent_peer() -> None:
    a, b = socket.socketpair()
    with a, b:
        start = time.monotonic()
        with pytest.raises(hyperpipe.TimeoutError):
            _auth.run_on_socket(_auth.client_handshake(KEY), b, start + 0.3)
        assert time.monotonic() - start >= 0.3 - 0.05
        assert b.gettimeout() is None  # left blocking


def test_socket_driver_deadline_covers_a_trickling_peer() -> None:
    a, b = socket.socketpair()
    with a, b:
        frame = _auth.encode_frame(b"#CHALLENGE#{sha256}" + b"x" * 40)
        stop = threading.Event()

        def trickle() -> None:
            for byte in frame:
                if stop.wait(0.1):
                    return
                try:
                    a.send(bytes([byte]))
                except OSError:
                    return

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        start = time.monotonic()
        with pytest.raises(hyperpipe.TimeoutError):
            _auth.run_on_socket(_auth.client_handshake(KEY), b, start + 0.5)
        stop.set()
        thread.join(5)
        # each byte arrived in time, the whole did not: the deadline is for all of it
        assert time.monotonic() - start < 0.5 + 1.0


def test_socket_driver_eof_is_an_authentication_error() -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(struct.pack("!i", 60) + b"#CHALLENGE#")
        a.close()
        with pytest.raises(hyperpipe.AuthenticationError, match="closed the connection"):
            _auth.run_on_socket(_auth.client_handshake(KEY), b, time.monotonic() + 5)


def test_nonblocking_reader_completes_against_a_blocking_peer_and_reads_nothing_more() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        reader = _auth.HandshakeReader(a, _auth.server_handshake(KEY))
        peer_error: list[BaseException] = []

        def peer() -> None:
            try:
                _auth.run_on_socket(_auth.client_handshake(KEY), b, time.monotonic() + 10)
                b.sendall(b"user data")  # must stay unread by the handshake
            except BaseException as exc:
                peer_error.append(exc)

        thread = threading.Thread(target=peer, daemon=True)
        thread.start()
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(a, selectors.EVENT_READ)
            deadline = time.monotonic() + 10
            while not reader.advance():
                assert time.monotonic() < deadline
                selector.select(1)
        thread.join(10)
        assert peer_error == []
        a.setblocking(True)
        a.settimeout(5)
        assert a.recv(100) == b"user data"
