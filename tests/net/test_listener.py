"""Listener and Client between hyperpipe ends: addresses, families, accept, timeouts, codecs."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Callable

import pytest

import hyperpipe
from hyperpipe import Client, Listener, _listener

from net_support import LOOPBACK, STEP_TIMEOUT

CLOCK_RES = 0.05


def test_exported_from_the_package() -> None:
    assert hyperpipe.Listener is Listener
    assert hyperpipe.Client is Client


@pytest.mark.parametrize("authkey", [None, b"key"])
def test_round_trip(family: str, address_for: Callable[[str], Any], authkey: Any, echo_server: Any) -> None:
    with Listener(address_for(family), authkey=authkey) as listener:
        server = echo_server(listener)
        with Client(listener.address, authkey=authkey, timeout=STEP_TIMEOUT) as conn:
            assert isinstance(conn, hyperpipe.Connection)
            for value in [1, "two", {"three": [3.0]}, b"\x00" * 100_000]:
                conn.send(value)
                assert conn.recv(timeout=STEP_TIMEOUT) == value
        assert server.accept_errors == []
        assert server.connection_errors == []


def test_address_family_and_last_accepted(family: str, address_for: Callable[[str], Any]) -> None:
    address = address_for(family)
    with Listener(address) as listener:
        if family == "AF_INET":
            host, port = listener.address
            assert host == LOOPBACK and port > 0
        else:
            assert listener.address == address
            assert os.path.exists(address)
        assert listener.last_accepted is None
        client = Client(listener.address)
        server = listener.accept(timeout=STEP_TIMEOUT)
        with client, server:
            if family == "AF_INET":
                assert listener.last_accepted == client._transport._sock.getsockname()
            else:
                assert listener.last_accepted == ""
    if family == "AF_UNIX":
        assert not os.path.exists(address)  # close() unlinks the socket file


def test_address_type_and_arbitrary_address() -> None:
    assert _listener.address_type(("127.0.0.1", 1)) == "AF_INET"
    assert _listener.address_type(("::1", 1)) == "AF_INET6"
    assert _listener.address_type(("::1", 1, 0, 0)) == "AF_INET6"
    assert _listener.address_type("/tmp/x") == "AF_UNIX"
    assert _listener.address_type("\0abstract") == "AF_UNIX"
    with pytest.raises(ValueError, match="unrecognized"):
        _listener.address_type(42)
    assert _listener.arbitrary_address("AF_INET") == ("localhost", 0)
    assert isinstance(_listener.arbitrary_address("AF_UNIX"), str)
    with pytest.raises(ValueError):
        _listener.arbitrary_address("AF_BLUETOOTH")
    assert {"AF_INET", "AF_UNIX"} <= set(_listener.families)


def test_default_listener_is_a_unix_socket() -> None:
    with Listener() as listener:
        assert _listener.address_type(listener.address) == "AF_UNIX"
        with Client(listener.address) as client, listener.accept(timeout=STEP_TIMEOUT) as server:
            client.send("hi")
            assert server.recv(timeout=STEP_TIMEOUT) == "hi"


def test_abstract_unix_address() -> None:
    address = f"\0hyperpipe-test-{os.getpid()}-{time.monotonic_ns()}"
    with Listener(address) as listener:
        with Client(address) as client, listener.accept(timeout=STEP_TIMEOUT) as server:
            server.send_bytes(b"abstract")
            assert client.recv_bytes(timeout=STEP_TIMEOUT) == b"abstract"


def test_argument_errors_match_the_stdlib(tmp_path: Any) -> None:
    with pytest.raises(TypeError, match="authkey should be a byte string"):
        Listener((LOOPBACK, 0), authkey="text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="authkey should be a byte string"):
        Client((LOOPBACK, 1), authkey="text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not recognized"):
        Listener((LOOPBACK, 0), family="AF_PIPE")
    with pytest.raises(TypeError, match="ssl_context"):
        Listener((LOOPBACK, 0), ssl_context=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_message_size"):
        Listener((LOOPBACK, 0), max_message_size=-1)
    with pytest.raises(ValueError, match="unknown codec"):
        Client((LOOPBACK, 1), codec="yaml")
    with pytest.raises(FileNotFoundError):
        Client(str(tmp_path / "nobody-listens-here"))


def test_connection_refused_on_tcp() -> None:
    probe = socket.socket()
    probe.bind((LOOPBACK, 0))
    port = probe.getsockname()[1]
    probe.close()  # bound then closed: nobody listens on this port
    with pytest.raises(ConnectionRefusedError):
        Client((LOOPBACK, port), timeout=STEP_TIMEOUT)


def test_accept_timeout(family: str, address_for: Callable[[str], Any]) -> None:
    with Listener(address_for(family)) as listener:
        start = time.monotonic()
        with pytest.raises(hyperpipe.TimeoutError):
            listener.accept(timeout=0.3)
        assert time.monotonic() - start >= 0.3 - CLOCK_RES
        with pytest.raises(hyperpipe.TimeoutError):
            listener.accept(timeout=0)
        # still usable afterwards
        with Client(listener.address) as client, listener.accept(timeout=STEP_TIMEOUT) as server:
            client.send(1)
            assert server.recv(timeout=STEP_TIMEOUT) == 1


def test_close_from_another_thread_wakes_accept(run_in_thread: Any) -> None:
    listener = Listener((LOOPBACK, 0))
    outcome: list[BaseException] = []

    def accept() -> None:
        try:
            listener.accept()
        except BaseException as exc:
            outcome.append(exc)

    thread = run_in_thread(accept)
    time.sleep(0.2)
    listener.close()
    thread.join(STEP_TIMEOUT)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], OSError)
    with pytest.raises(OSError, match="listener is closed"):
        listener.accept(timeout=0)
    listener.close()  # idempotent


def test_clients_queued_before_accept_are_all_served(family: str, address_for: Callable[[str], Any]) -> None:
    with Listener(address_for(family), backlog=16, authkey=b"k") as listener:
        results: list[Any] = []

        def connect(i: int) -> None:
            with Client(listener.address, authkey=b"k", timeout=STEP_TIMEOUT) as conn:
                conn.send(i)
                results.append(conn.recv(timeout=STEP_TIMEOUT))

        threads = [threading.Thread(target=connect, args=(i,), daemon=True) for i in range(8)]
        for thread in threads:
            thread.start()
        for _ in threads:
            with listener.accept(timeout=STEP_TIMEOUT) as server:
                server.send(server.recv(timeout=STEP_TIMEOUT) * 10)
        for thread in threads:
            thread.join(STEP_TIMEOUT)
        assert sorted(results) == [i * 10 for i in range(8)]


def test_timeouts_work_on_socket_connections(address_for: Callable[[str], Any]) -> None:
    with Listener(address_for("AF_INET")) as listener:
        with Client(listener.address) as client, listener.accept(timeout=STEP_TIMEOUT) as server:
            with pytest.raises(hyperpipe.TimeoutError):
                client.recv(timeout=0.1)
            server.send("late")
            assert client.recv(timeout=STEP_TIMEOUT) == "late"


def test_peer_close_is_eof(family: str, address_for: Callable[[str], Any]) -> None:
    with Listener(address_for(family)) as listener:
        client = Client(listener.address)
        with listener.accept(timeout=STEP_TIMEOUT) as server:
            client.send("last")
            client.close()
            assert server.recv(timeout=STEP_TIMEOUT) == "last"
            with pytest.raises(EOFError):
                server.recv(timeout=STEP_TIMEOUT)


# -- codecs --------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["json", "msgpack"])
def test_safe_codecs_end_to_end(codec: str, family: str, address_for: Callable[[str], Any], echo_server: Any) -> None:
    if codec not in hyperpipe._codecs.available_codecs():
        pytest.skip(f"{codec} is not installed")
    with Listener(address_for(family), authkey=b"k", codec=codec) as listener:
        echo_server(listener)
        with Client(listener.address, authkey=b"k", codec=codec, timeout=STEP_TIMEOUT) as conn:
            message = {"op": "add", "args": [1, 2.5, "x", None, True]}
            conn.send(message)
            assert conn.recv(timeout=STEP_TIMEOUT) == message


def test_json_server_refuses_a_pickle_without_unpickling(address_for: Callable[[str], Any]) -> None:
    class Boom:
        def __reduce__(self) -> Any:
            return (os._exit, (99,))  # would kill the test process if ever unpickled

    with Listener(address_for("AF_INET"), codec="json") as listener:
        with Client(listener.address) as client, listener.accept(timeout=STEP_TIMEOUT) as server:
            client.send(Boom())
            with pytest.raises(ValueError):
                server.recv(timeout=STEP_TIMEOUT)
            client.send_bytes(b'{"ok": true}')
            assert server.recv(timeout=STEP_TIMEOUT) == {"ok": True}  # the stream is intact


def test_max_message_size_is_checked_from_the_header(address_for: Callable[[str], Any]) -> None:
    with Listener(address_for("AF_INET"), max_message_size=1024) as listener:
        with Client(listener.address) as client, listener.accept(timeout=STEP_TIMEOUT) as server:
            client.send_bytes(b"x" * 1024)
            assert server.recv_bytes(timeout=STEP_TIMEOUT) == b"x" * 1024
            client.send_bytes(b"y" * 1025)
            with pytest.raises(hyperpipe.MessageTooLongError, match="max_message_size"):
                server.recv_bytes(timeout=STEP_TIMEOUT)


def test_client_max_message_size(address_for: Callable[[str], Any]) -> None:
    with Listener(address_for("AF_UNIX")) as listener:
        with Client(listener.address, max_message_size=10) as client, listener.accept(timeout=STEP_TIMEOUT) as server:
            server.send_bytes(b"z" * 11)
            with pytest.raises(hyperpipe.MessageTooLongError):
                client.recv_bytes(timeout=STEP_TIMEOUT)


@pytest.mark.parametrize("stdlib", [False, True], ids=["hyperpipe", "stdlib"])
def test_loopback_pair_for_the_benchmark(family: str, stdlib: bool) -> None:
    import multiprocessing.connection as mpc

    a, b = _listener.loopback_pair(family, b"bench", stdlib=stdlib)
    with a, b:
        expected = mpc.Connection if stdlib else hyperpipe.Connection
        assert isinstance(a, expected) and isinstance(b, expected)
        a.send_bytes(b"ping")
        assert b.recv_bytes() == b"ping"
        b.send({"pong": 1})
        assert a.recv() == {"pong": 1}


def test_close_wakes_a_receive_blocked_in_recv_on_tcp(family: str, address_for: Any) -> None:
    """With no timeout the receive waits in recv() itself; close() from another thread
    shuts the socket down for reading, which wakes it (ConnectionClosedError)."""
    with Listener(address_for(family)) as listener:
        accepted: list = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
        thread.start()
        client = Client(listener.address, timeout=STEP_TIMEOUT)
        thread.join(STEP_TIMEOUT)
        server = accepted[0]
        errors: list = []

        def receive() -> None:
            try:
                client.recv_bytes()
            except BaseException as exc:
                errors.append(exc)

        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        time.sleep(0.2)
        assert receiver.is_alive() and client._transport._wake_fd < 0  # in recv(), no poll
        client.close()
        receiver.join(10)
        assert not receiver.is_alive(), "close() did not wake the receive"
        assert len(errors) == 1 and isinstance(errors[0], hyperpipe.ConnectionClosedError)
        server.close()
