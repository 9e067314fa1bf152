"""Bad peers: each gets a clear error on its own connection; the Listener serves the others.

Every test runs a hyperpipe Listener behind the threaded echo server of conftest, does
something hostile on one raw socket, then proves that a well-behaved client is served.
"""

from __future__ import annotations

import pickle
import socket
import struct
import threading
import time
import tracemalloc
from typing import Any, Callable

import pytest

import hyperpipe
from hyperpipe import Client, Listener

from net_support import STEP_TIMEOUT

KEY = b"hostile tests"


def raw_connect(address: Any) -> socket.socket:
    family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
    sock = socket.socket(family)
    sock.settimeout(STEP_TIMEOUT)
    sock.connect(address)
    return sock


def frame(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


def assert_still_serving(listener: Any, authkey: Any = None) -> None:
    with Client(listener.address, authkey=authkey, timeout=STEP_TIMEOUT) as conn:
        conn.send(("still", "serving"))
        assert conn.recv(timeout=STEP_TIMEOUT) == ("still", "serving")


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- during the handshake --------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # the header reads as a huge length
        frame(b"no digest here at all, just words"),
        struct.pack("!i", -1) + struct.pack("!Q", 2**62),  # 2**62 bytes announced
        struct.pack("!i", -7),
        frame(pickle.dumps("user data instead of a digest")),
    ],
    ids=["http", "no-digest", "length-2**62", "negative-length", "pickle"],
)
def test_garbage_in_the_handshake(family: str, address_for: Any, echo_server: Any, garbage: bytes) -> None:
    with Listener(address_for(family), authkey=KEY) as listener:
        server = echo_server(listener)
        with raw_connect(listener.address) as sock:
            challenge_header = sock.recv(4)
            assert len(challenge_header) == 4
            sock.sendall(garbage)
            wait_for(lambda: server.accept_errors, "the handshake failure")
        error = server.accept_errors[0]
        assert isinstance(error, hyperpipe.AuthenticationError)
        assert_still_serving(listener, KEY)
        assert len(server.accept_errors) == 1


def test_handshake_length_is_checked_before_reading(address_for: Any, echo_server: Any) -> None:
    with Listener(address_for("AF_INET"), authkey=KEY) as listener:
        server = echo_server(listener)
        with raw_connect(listener.address) as sock:
            sock.recv(4)
            sock.sendall(struct.pack("!i", 257))  # one byte over the bound, no body sent
            wait_for(lambda: server.accept_errors, "the refusal")
        assert "at most 256" in str(server.accept_errors[0])


def test_wrong_key(family: str, address_for: Any, echo_server: Any) -> None:
    with Listener(address_for(family), authkey=KEY) as listener:
        server = echo_server(listener)
        with pytest.raises(hyperpipe.AuthenticationError, match="rejected"):
            Client(listener.address, authkey=b"wrong", timeout=STEP_TIMEOUT)
        wait_for(lambda: server.accept_errors, "the server-side failure")
        assert isinstance(server.accept_errors[0], hyperpipe.AuthenticationError)
        assert "wrong" in str(server.accept_errors[0])
        assert_still_serving(listener, KEY)


def test_key_on_the_client_only(address_for: Any, echo_server: Any) -> None:
    with Listener(address_for("AF_INET")) as listener:
        echo_server(listener)
        with pytest.raises(hyperpipe.TimeoutError, match="does the Listener use an authkey"):
            Client(listener.address, authkey=KEY, handshake_timeout=0.5)
        assert_still_serving(listener)


def test_key_on_the_server_only(address_for: Any, echo_server: Any) -> None:
    with Listener(address_for("AF_UNIX"), authkey=KEY) as listener:
        server = echo_server(listener)
        with Client(listener.address, timeout=STEP_TIMEOUT) as conn:
            with pytest.raises(hyperpipe.AuthenticationError, match="needs an authkey"):
                conn.recv(timeout=STEP_TIMEOUT)
        wait_for(lambda: server.accept_errors, "the server-side failure")
        assert isinstance(server.accept_errors[0], hyperpipe.AuthenticationError)
        assert_still_serving(listener, KEY)


def test_key_on_the_server_only_client_sends_first(address_for: Any, echo_server: Any) -> None:
    with Listener(address_for("AF_INET"), authkey=KEY) as listener:
        server = echo_server(listener)
        with Client(listener.address, timeout=STEP_TIMEOUT) as conn:
            conn.send("hello?")  # read by the server as a (bad) digest
            wait_for(lambda: server.accept_errors, "the server-side failure")
        assert isinstance(server.accept_errors[0], hyperpipe.AuthenticationError)
        assert_still_serving(listener, KEY)


def test_silent_client_does_not_block_others(family: str, address_for: Any, echo_server: Any) -> None:
    with Listener(address_for(family), authkey=KEY, handshake_timeout=3.0) as listener:
        server = echo_server(listener)
        with raw_connect(listener.address) as silent:
            # a well-behaved client connects after the silent one and is served first
            assert_still_serving(listener, KEY)
            assert server.accept_errors == []  # the silent one is still pending
            wait_for(lambda: server.accept_errors, "the handshake deadline")
            assert "did not complete" in str(server.accept_errors[0])
            silent.settimeout(STEP_TIMEOUT)
            data = silent.recv(4096)  # the challenge, then EOF: the server hung up
            while data:
                data = silent.recv(4096)


def test_one_byte_a_second_during_the_handshake(address_for: Any, echo_server: Any) -> None:
    with Listener(address_for("AF_INET"), authkey=KEY, handshake_timeout=1.5) as listener:
        server = echo_server(listener)
        stop = threading.Event()
        sent = []

        def trickle() -> None:
            with raw_connect(listener.address) as sock:
                sock.recv(4)
                for byte in frame(b"{sha256}" + b"x" * 32):
                    try:
                        sock.send(bytes([byte]))
                    except OSError:
                        return  # dropped by the server, as it should
                    sent.append(byte)
                    if stop.wait(1.0):
                        return

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        wait_for(lambda: sent, "the first trickled byte")
        assert_still_serving(listener, KEY)
        wait_for(lambda: server.accept_errors, "the handshake deadline")
        assert "did not complete" in str(server.accept_errors[0])
        stop.set()
        thread.join(STEP_TIMEOUT)
        assert len(sent) < 40  # it never got the whole answer in


# -- after the handshake ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data, expected",
    [
        (frame(b"\x80\x05garbage that is no pickle"), Exception),
        (frame(b"x" * 10)[:8], hyperpipe.TruncatedMessageError),  # truncated, then EOF
        (struct.pack("!i", 1000) + b"only a little", hyperpipe.TruncatedMessageError),
        # no max_message_size: no memory is committed up front (an address-space reservation
        # at most), and the peer's end of stream inside the frame is the error
        (struct.pack("!i", -1) + struct.pack("!Q", 2**62), hyperpipe.ProtocolError),
        (struct.pack("!i", -5), hyperpipe.ProtocolError),
    ],
    ids=["not-a-pickle", "truncated-frame", "short-body", "length-2**62", "negative-length"],
)
def test_bad_frames_break_only_their_connection(
    family: str, address_for: Any, echo_server: Any, data: bytes, expected: type
) -> None:
    with Listener(address_for(family)) as listener:
        server = echo_server(listener)
        with raw_connect(listener.address) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            wait_for(lambda: server.connection_errors, "the connection error")
        assert isinstance(server.connection_errors[0], expected)
        assert_still_serving(listener)
        assert len(server.connection_errors) == 1


def test_max_message_size_refuses_before_allocating(address_for: Any, echo_server: Any) -> None:
    announced = 512 * 1024 * 1024  # allocatable, so only the check keeps it from happening
    with Listener(address_for("AF_INET"), max_message_size=1 << 20) as listener:
        with raw_connect(listener.address) as sock:
            with listener.accept(timeout=STEP_TIMEOUT) as conn:
                sock.sendall(struct.pack("!i", announced) + b"abc")
                tracemalloc.start()
                try:
                    with pytest.raises(hyperpipe.MessageTooLongError, match="max_message_size"):
                        conn.recv_bytes(timeout=STEP_TIMEOUT)
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
                assert peak < 16 * 1024 * 1024
        echo_server(listener)
        assert_still_serving(listener)


def test_one_byte_a_second_after_the_handshake(address_for: Any, echo_server: Any) -> None:
    with Listener(address_for("AF_UNIX")) as listener:
        echo_server(listener)
        stop = threading.Event()

        def trickle() -> None:
            with raw_connect(listener.address) as sock:
                for byte in frame(pickle.dumps("slow")):
                    sock.send(bytes([byte]))
                    if stop.wait(1.0):
                        return

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        for _ in range(3):
            assert_still_serving(listener)
        stop.set()
        thread.join(STEP_TIMEOUT)


def test_receive_timeout_keeps_a_partial_frame(address_for: Any) -> None:
    with Listener(address_for("AF_INET")) as listener:
        with raw_connect(listener.address) as sock, listener.accept(timeout=STEP_TIMEOUT) as conn:
            payload = pickle.dumps({"complete": True})
            data = frame(payload)
            sock.sendall(data[:5])
            with pytest.raises(hyperpipe.TimeoutError):
                conn.recv(timeout=0.2)
            sock.sendall(data[5:])
            assert conn.recv(timeout=STEP_TIMEOUT) == {"complete": True}


def test_unchecked_length_does_not_allocate_before_data_arrives(address_for: Any) -> None:
    with Listener(address_for("AF_INET")) as listener:
        with raw_connect(listener.address) as sock, listener.accept(timeout=STEP_TIMEOUT) as conn:
            sock.sendall(struct.pack("!i", 1 << 30) + b"abc")
            tracemalloc.start()
            try:
                with pytest.raises(hyperpipe.TimeoutError):
                    conn.recv_bytes(timeout=0.2)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 64 * 1024 * 1024
