"""TLS with a standard ``ssl.SSLContext``: server auth, mutual auth, mismatches, big messages.

Certificates are made at test time by the ``pki`` fixture (conftest, ``openssl`` CLI).
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

import pytest

import hyperpipe
from hyperpipe import Client, Listener

from net_support import LOOPBACK, STEP_TIMEOUT

KEY = b"tls and hmac"


def tcp() -> Any:
    return (LOOPBACK, 0)


def wait_for_errors(server: Any, count: int) -> None:
    """accept() reports a failed handshake shortly after the client saw it fail."""
    for _ in range(int(STEP_TIMEOUT / 0.01)):
        if len(server.accept_errors) >= count:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"expected {count} accept errors, got {server.accept_errors}")


@pytest.mark.parametrize("authkey", [None, KEY], ids=["no-key", "key"])
def test_tls_round_trip(pki: Any, echo_server: Any, authkey: Any) -> None:
    with Listener(tcp(), authkey=authkey, ssl_context=pki.server_context()) as listener:
        server = echo_server(listener)
        with Client(listener.address, authkey=authkey, ssl_context=pki.client_context(),
                    timeout=STEP_TIMEOUT) as conn:
            assert isinstance(conn._transport._sock, ssl.SSLSocket)
            for value in ["small", list(range(1000)), b"\x01" * 5_000_000]:
                conn.send(value)
                assert conn.recv(timeout=STEP_TIMEOUT) == value
        assert server.accept_errors == []


def test_tls_over_a_unix_socket(pki: Any, tmp_path: Any) -> None:
    client_context = pki.client_context()
    client_context.check_hostname = False  # no host name on a Unix socket
    with Listener(str(tmp_path / "tls.sock"), ssl_context=pki.server_context()) as listener:
        result: list[Any] = []

        def serve() -> None:
            with listener.accept(timeout=STEP_TIMEOUT) as conn:
                result.append(conn.recv(timeout=STEP_TIMEOUT))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with Client(listener.address, ssl_context=client_context, timeout=STEP_TIMEOUT) as conn:
            conn.send("over unix")
        thread.join(STEP_TIMEOUT)
        assert result == ["over unix"]


def test_mutual_tls(pki: Any, echo_server: Any) -> None:
    with Listener(tcp(), ssl_context=pki.server_context(require_client_cert=True)) as listener:
        server = echo_server(listener)
        with Client(listener.address, ssl_context=pki.client_context(with_cert=True),
                    timeout=STEP_TIMEOUT) as conn:
            conn.send("mutual")
            assert conn.recv(timeout=STEP_TIMEOUT) == "mutual"
        # no client certificate: the server refuses it, and goes on serving
        with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
            conn = Client(listener.address, ssl_context=pki.client_context(), timeout=STEP_TIMEOUT)
            try:
                conn.send("no cert")  # TLS 1.3 reports the refusal on first use
                conn.recv(timeout=STEP_TIMEOUT)
            finally:
                conn.close()
        # a certificate from another CA: refused too
        with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
            conn = Client(listener.address, ssl_context=pki.client_context(rogue_cert=True),
                          timeout=STEP_TIMEOUT)
            try:
                conn.send("rogue cert")
                conn.recv(timeout=STEP_TIMEOUT)
            finally:
                conn.close()
        with Client(listener.address, ssl_context=pki.client_context(with_cert=True),
                    timeout=STEP_TIMEOUT) as conn:
            conn.send("still serving")
            assert conn.recv(timeout=STEP_TIMEOUT) == "still serving"
        wait_for_errors(server, 2)
        assert len(server.accept_errors) == 2
        for error in server.accept_errors:
            assert isinstance(error, hyperpipe.AuthenticationError)
            assert "TLS handshake" in str(error)
            assert isinstance(error.__cause__, ssl.SSLError)


def test_server_certificate_from_an_unknown_ca_is_refused(pki: Any, echo_server: Any) -> None:
    with Listener(tcp(), ssl_context=pki.server_context(rogue=True)) as listener:
        server = echo_server(listener)
        with pytest.raises(ssl.SSLCertVerificationError):
            Client(listener.address, ssl_context=pki.client_context(), timeout=STEP_TIMEOUT)
        wait_for_errors(server, 1)
        assert all(isinstance(e, hyperpipe.AuthenticationError) for e in server.accept_errors)


def test_wrong_host_name_is_refused(pki: Any, echo_server: Any) -> None:
    with Listener(tcp(), ssl_context=pki.server_context()) as listener:
        echo_server(listener)
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
            Client(listener.address, ssl_context=pki.client_context(),
                   server_hostname="not-this-host.example", timeout=STEP_TIMEOUT)


def test_plain_client_to_tls_listener(pki: Any, echo_server: Any) -> None:
    with Listener(tcp(), ssl_context=pki.server_context()) as listener:
        server = echo_server(listener)
        with Client(listener.address, timeout=STEP_TIMEOUT) as conn:
            conn.send("plain text")
            with pytest.raises((EOFError, ConnectionError, hyperpipe.ProtocolError)):
                conn.recv(timeout=STEP_TIMEOUT)
        wait_for_errors(server, 1)
        assert len(server.accept_errors) == 1
        assert "TLS handshake" in str(server.accept_errors[0])
        with Client(listener.address, ssl_context=pki.client_context(), timeout=STEP_TIMEOUT) as conn:
            conn.send(1)
            assert conn.recv(timeout=STEP_TIMEOUT) == 1


def test_tls_client_to_plain_listener(pki: Any, echo_server: Any) -> None:
    with Listener(tcp(), handshake_timeout=1.0) as listener:
        server = echo_server(listener)
        with pytest.raises((ssl.SSLError, ConnectionError, hyperpipe.TimeoutError)):
            Client(listener.address, ssl_context=pki.client_context(), timeout=2.0)
        with Client(listener.address, timeout=STEP_TIMEOUT) as conn:
            conn.send("plain")
            assert conn.recv(timeout=STEP_TIMEOUT) == "plain"
        # the echo server saw the ClientHello as a frame: an error on that connection only
        assert server.accept_errors == []


def test_silent_client_does_not_block_tls_accept(pki: Any, echo_server: Any) -> None:
    with Listener(tcp(), ssl_context=pki.server_context(), handshake_timeout=3.0) as listener:
        server = echo_server(listener)
        with socket.create_connection(listener.address, timeout=STEP_TIMEOUT):
            with Client(listener.address, ssl_context=pki.client_context(), timeout=STEP_TIMEOUT) as conn:
                conn.send("served first")
                assert conn.recv(timeout=STEP_TIMEOUT) == "served first"
            assert server.accept_errors == []
            deadline = threading.Event()
            for _ in range(int(STEP_TIMEOUT / 0.05)):
                if server.accept_errors:
                    break
                deadline.wait(0.05)
            assert "did not complete" in str(server.accept_errors[0])


def test_tls_timeout_and_poll(pki: Any) -> None:
    with Listener(tcp(), ssl_context=pki.server_context()) as listener:
        accepted: list[Any] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept(timeout=STEP_TIMEOUT)))
        thread.start()
        with Client(listener.address, ssl_context=pki.client_context(), timeout=STEP_TIMEOUT) as client:
            thread.join(STEP_TIMEOUT)
            with accepted[0] as server:
                with pytest.raises(hyperpipe.TimeoutError):
                    client.recv(timeout=0.1)
                server.send("a")
                server.send("b")  # both may arrive in one TLS read: poll must see the second
                assert client.recv(timeout=STEP_TIMEOUT) == "a"
                assert client.poll(STEP_TIMEOUT)
                assert client.recv(timeout=STEP_TIMEOUT) == "b"
                assert not client.poll(0)


def test_large_message_over_tls(pki: Any, echo_server: Any) -> None:
    payload = bytes(range(256)) * (48 * 1024 * 1024 // 256)
    with Listener(tcp(), authkey=KEY, ssl_context=pki.server_context()) as listener:
        echo_server(listener, bytes_mode=True)
        with Client(listener.address, authkey=KEY, ssl_context=pki.client_context(),
                    timeout=STEP_TIMEOUT) as conn:
            conn.send_bytes(payload)
            assert conn.recv_bytes(timeout=STEP_TIMEOUT) == payload


def test_tls_poll_is_not_fooled_by_tls_records(pki: Any) -> None:
    with Listener(tcp(), ssl_context=pki.server_context()) as listener:
        accepted: list[Any] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept(timeout=STEP_TIMEOUT)))
        thread.start()
        with Client(listener.address, ssl_context=pki.client_context(), timeout=STEP_TIMEOUT) as client:
            thread.join(STEP_TIMEOUT)
            with accepted[0]:
                assert not client.poll(0.2)


def test_context_of_the_wrong_side_is_refused_up_front(pki: Any) -> None:
    with pytest.raises(ValueError, match="server-side"):
        Listener(tcp(), ssl_context=pki.client_context())
    with pytest.raises(ValueError, match="client-side"):
        Client(tcp(), ssl_context=pki.server_context())
