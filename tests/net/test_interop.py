"""Wire compatibility with the standard library, both directions, with and without authkey.

In-process peers are this interpreter's ``multiprocessing.connection`` (3.11: the legacy
HMAC-MD5 handshake). Peers in a subprocess run other installed Pythons (3.12+: the
modern ``{digest}`` handshake); those tests skip when no such interpreter is found.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import os
import shutil
import subprocess
import threading
from typing import Any, Callable, Optional

import pytest

import hyperpipe
from hyperpipe import Client, Listener

from net_support import STEP_TIMEOUT

KEY = b"interop key"
MEDIUM = 64 * 1024 * 1024
HUGE = 2**31 + 4099  # needs the -1 + 8-byte length header


def _pattern(size: int) -> bytes:
    block = bytes((i * 7) & 0xFF for i in range(251))
    return (block * (size // 251 + 1))[:size]


def _in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", target()))
        except BaseException as exc:
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _finish(thread: threading.Thread, outcome: list[Any], timeout: float = STEP_TIMEOUT) -> Any:
    thread.join(timeout)
    assert not thread.is_alive(), "peer thread hung"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


# -- this interpreter's stdlib (legacy handshake) --------------------------------------


@pytest.mark.parametrize("authkey", [None, KEY], ids=["no-key", "key"])
def test_hyperpipe_client_to_stdlib_listener(family: str, address_for: Callable[[str], Any], authkey: Any) -> None:
    with mpc.Listener(address_for(family), authkey=authkey) as listener:

        def serve() -> Any:
            with listener.accept() as conn:
                got = conn.recv()
                conn.send(("echo", got))
                conn.send_bytes(conn.recv_bytes())
                return got

        thread, outcome = _in_thread(serve)
        with Client(listener.address, authkey=authkey, timeout=STEP_TIMEOUT) as conn:
            conn.send({"from": "hyperpipe", "n": [1, 2, 3]})
            assert conn.recv(timeout=STEP_TIMEOUT) == ("echo", {"from": "hyperpipe", "n": [1, 2, 3]})
            conn.send_bytes(b"bytes too")
            assert conn.recv_bytes(timeout=STEP_TIMEOUT) == b"bytes too"
        assert _finish(thread, outcome) == {"from": "hyperpipe", "n": [1, 2, 3]}


@pytest.mark.parametrize("authkey", [None, KEY], ids=["no-key", "key"])
def test_stdlib_client_to_hyperpipe_listener(family: str, address_for: Callable[[str], Any], authkey: Any) -> None:
    with Listener(address_for(family), authkey=authkey) as listener:

        def connect() -> Any:
            with mpc.Client(listener.address, authkey=authkey) as conn:
                conn.send(["from", "stdlib"])
                reply = conn.recv()
                conn.send_bytes(b"raw")
                return reply, conn.recv_bytes()

        thread, outcome = _in_thread(connect)
        with listener.accept(timeout=STEP_TIMEOUT) as conn:
            assert isinstance(conn, hyperpipe.Connection)
            got = conn.recv(timeout=STEP_TIMEOUT)
            conn.send(("echo", got))
            conn.send_bytes(conn.recv_bytes(timeout=STEP_TIMEOUT))
            assert _finish(thread, outcome) == (("echo", ["from", "stdlib"]), b"raw")


def _big_round_trip_hyperpipe_client(address: Any, authkey: Any, size: int) -> None:
    payload = _pattern(size)
    with mpc.Listener(address, authkey=authkey) as listener:

        def serve() -> int:
            with listener.accept() as conn:
                data = conn.recv_bytes()
                ok = data == payload
                del data
                conn.send_bytes(payload)
                return ok

        thread, outcome = _in_thread(serve)
        with Client(listener.address, authkey=authkey, timeout=STEP_TIMEOUT) as conn:
            conn.send_bytes(payload)
            back = conn.recv_bytes()
            assert len(back) == size and back == payload
            del back
        assert _finish(thread, outcome, timeout=600) is True


def _big_round_trip_stdlib_client(address: Any, authkey: Any, size: int) -> None:
    payload = _pattern(size)
    with Listener(address, authkey=authkey) as listener:

        def connect() -> bool:
            with mpc.Client(listener.address, authkey=authkey) as conn:
                conn.send_bytes(payload)
                data = conn.recv_bytes()
                return data == payload

        thread, outcome = _in_thread(connect)
        with listener.accept(timeout=STEP_TIMEOUT) as conn:
            buf = bytearray(size)
            assert conn.recv_bytes_into(buf) == size
            assert buf == payload
            del buf
            conn.send_bytes(payload)
            assert _finish(thread, outcome, timeout=600) is True


@pytest.mark.parametrize("authkey", [None, KEY], ids=["no-key", "key"])
def test_large_messages_both_directions(family: str, address_for: Callable[[str], Any], authkey: Any) -> None:
    _big_round_trip_hyperpipe_client(address_for(family), authkey, MEDIUM)
    _big_round_trip_stdlib_client(address_for(family), authkey, MEDIUM)


@pytest.mark.huge
def test_huge_messages_hyperpipe_client_to_stdlib(address_for: Callable[[str], Any]) -> None:
    _big_round_trip_hyperpipe_client(address_for("AF_INET"), KEY, HUGE)


@pytest.mark.huge
def test_huge_messages_stdlib_client_to_hyperpipe(address_for: Callable[[str], Any]) -> None:
    _big_round_trip_stdlib_client(address_for("AF_UNIX"), KEY, HUGE)


# -- other interpreters (3.12+: the modern handshake) ------------------------------------

_PEER_SCRIPT = r"""
import sys, multiprocessing.connection as mpc
role, family, address, key = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
key = key.encode() if key != "-" else None
if family == "AF_INET":
    host, port = address.rsplit(":", 1)
    address = (host, int(port))
if role == "server":
    with mpc.Listener(address, authkey=key) as listener:
        print(repr(listener.address), flush=True)
        with listener.accept() as conn:
            obj = conn.recv()
            conn.send(("echo", sys.version_info[:2], obj))
            conn.send_bytes(conn.recv_bytes())
else:
    with mpc.Client(address, authkey=key) as conn:
        conn.send(["hello", sys.version_info[:2]])
        print(repr(conn.recv()), flush=True)
        conn.send_bytes(b"x" * 100000)
        assert conn.recv_bytes() == b"y" * 100000
print("done", flush=True)
"""


def _other_pythons() -> list[str]:
    found = []
    for version in ("3.12", "3.13", "3.10"):
        path = shutil.which(f"python{version}")
        pyenv = os.path.expanduser("~/.pyenv/versions")
        if os.path.isdir(pyenv):
            for name in sorted(os.listdir(pyenv)):
                if name.startswith(version + "."):
                    path = os.path.join(pyenv, name, "bin", "python")
        if path and os.path.exists(path):
            found.append(path)
    return found


OTHER_PYTHONS = _other_pythons()


def _version_of(python: str) -> tuple[int, int]:
    out = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True, timeout=STEP_TIMEOUT, check=True)
    return tuple(int(x) for x in out.stdout.strip("()\n ").split(","))  # type: ignore[return-value]


def _encode_address(address: Any) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else address


@pytest.fixture(params=OTHER_PYTHONS or [None], ids=lambda p: os.path.basename(os.path.dirname(os.path.dirname(p))) if p else "none")
def other_python(request: pytest.FixtureRequest) -> str:
    if request.param is None:
        pytest.skip("no other Python installed to test the modern handshake against")
    return request.param


@pytest.mark.parametrize("authkey", [None, KEY], ids=["no-key", "key"])
def test_hyperpipe_client_to_other_python_listener(
    other_python: str, family: str, address_for: Callable[[str], Any], authkey: Optional[bytes]
) -> None:
    address = address_for(family)
    if family == "AF_INET":
        address = (address[0], 0)
    proc = subprocess.Popen(
        [other_python, "-c", _PEER_SCRIPT, "server", family, _encode_address(address), (authkey or b"-").decode()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, proc.stderr.read()  # type: ignore[union-attr]
        real_address = eval(line)  # a repr of a str or (host, port) tuple from our own script
        with Client(real_address, authkey=authkey, timeout=STEP_TIMEOUT) as conn:
            conn.send({"from": "hyperpipe"})
            kind, version, obj = conn.recv(timeout=STEP_TIMEOUT)
            assert (kind, obj) == ("echo", {"from": "hyperpipe"})
            assert tuple(version) == _version_of(other_python)
            conn.send_bytes(b"z" * 300000)
            assert conn.recv_bytes(timeout=STEP_TIMEOUT) == b"z" * 300000
        out, err = proc.communicate(timeout=STEP_TIMEOUT)
        assert proc.returncode == 0, err
        assert out.strip() == "done"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("authkey", [None, KEY], ids=["no-key", "key"])
def test_other_python_client_to_hyperpipe_listener(
    other_python: str, family: str, address_for: Callable[[str], Any], authkey: Optional[bytes]
) -> None:
    with Listener(address_for(family), authkey=authkey) as listener:
        proc = subprocess.Popen(
            [other_python, "-c", _PEER_SCRIPT, "client", family, _encode_address(listener.address),
             (authkey or b"-").decode()],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            with listener.accept(timeout=STEP_TIMEOUT) as conn:
                hello, version = conn.recv(timeout=STEP_TIMEOUT)
                assert hello == "hello"
                conn.send(("pong", version))
                assert conn.recv_bytes(timeout=STEP_TIMEOUT) == b"x" * 100000
                conn.send_bytes(b"y" * 100000)
                out, err = proc.communicate(timeout=STEP_TIMEOUT)
            assert proc.returncode == 0, err
            assert out.splitlines() == [repr(("pong", version)), "done"]
            assert tuple(version) == _version_of(other_python)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_modern_peer_speaks_the_modern_protocol() -> None:
    """A 3.12+ stdlib answers our challenge with a ``{sha256}`` digest, not raw MD5."""
    modern = [p for p in OTHER_PYTHONS if _version_of(p) >= (3, 12)]
    if not modern:
        pytest.skip("no Python 3.12+ installed")
    script = (
        "import sys, multiprocessing.connection as mpc\n"
        "c = mpc.Connection(int(sys.argv[1]))\n"
        "mpc.answer_challenge(c, b'k')\n"
    )
    import socket

    a, b = socket.socketpair()
    with a:
        proc = subprocess.Popen([modern[0], "-c", script, str(b.fileno())], pass_fds=[b.fileno()])
        b.close()
        try:
            conn = mpc.Connection(os.dup(a.fileno()))
            conn.send_bytes(b"#CHALLENGE#{sha256}" + b"r" * 40)
            response = conn.recv_bytes(256)
            assert response.startswith(b"{sha256}") and len(response) == 8 + 32
            conn.send_bytes(b"#WELCOME#")
            conn.close()
            assert proc.wait(STEP_TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
