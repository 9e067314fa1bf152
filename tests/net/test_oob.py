"""Out-of-band frames: big pickle-5 buffers go beside the pickle stream between hyperpipe
peers, and never to a standard-library peer.

Who reads them is settled without a byte a stdlib peer could notice: the two ends of
``Pipe(transport="socket")`` always do; Listener/Client peers announce it with a tag on the
authkey challenge (docs/wire.md). With no authkey nothing is announced.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import pickle
import socket
import struct
import threading
from typing import Any, Callable

import pytest

import hyperpipe
from hyperpipe import Client, Listener, _auth, _framing
from hyperpipe._connection import Connection
from hyperpipe._socket_transport import SocketTransport

from net_support import STEP_TIMEOUT

KEY = b"oob key"
BIG = 3 * _framing.OOB_MIN_BUFFER + 5


class Blob:
    """An object carrying a buffer the pickle-5 way (as numpy arrays do)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: int) -> Any:
        if protocol >= 5:
            return Blob, (pickle.PickleBuffer(self.data),)
        return Blob, (bytes(self.data),)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blob) and bytes(other.data) == bytes(self.data)


def _pattern(size: int, seed: int = 0) -> bytearray:
    return bytearray((i * 31 + seed) & 0xFF for i in range(size))


def _message() -> tuple:
    return ("header", Blob(_pattern(BIG)), Blob(_pattern(100, 1)), Blob(_pattern(BIG + 1, 2)))


def _raw_pair(oob: bool = True) -> tuple[Connection, socket.socket]:
    """A hyperpipe end whose peer is a bare socket, to look at the wire."""
    s1, s2 = socket.socketpair()
    return Connection(SocketTransport(sock=s1, oob=oob)), s2


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        assert chunk, "stream ended early"
        out += chunk
    return bytes(out)


def test_the_wire_carries_the_buffers_beside_the_stream() -> None:
    conn, peer = _raw_pair()
    with conn, peer:
        message = _message()
        thread = threading.Thread(target=conn.send, args=(message,), daemon=True)
        thread.start()
        (mark,) = struct.unpack("!i", _read_exactly(peer, 4))
        assert mark == _framing.OOB_MARK
        stream_size, count = struct.unpack("!QI", _read_exactly(peer, 12))
        sizes = struct.unpack(f"!{count}Q", _read_exactly(peer, 8 * count))
        assert sizes == (BIG, BIG + 1)  # the 100-byte buffer stayed in the stream
        stream = _read_exactly(peer, stream_size)
        buffers = [_read_exactly(peer, n) for n in sizes]
        thread.join(STEP_TIMEOUT)
        assert buffers == [bytes(_pattern(BIG)), bytes(_pattern(BIG + 1, 2))]
        assert pickle.loads(stream, buffers=buffers) == message
        assert stream_size < 1000  # no copy of the big buffers inside it


def test_without_oob_the_same_object_is_one_stdlib_frame() -> None:
    conn, peer = _raw_pair(oob=False)
    with conn, peer:
        message = _message()
        thread = threading.Thread(target=conn.send, args=(message,), daemon=True)
        thread.start()
        (size,) = struct.unpack("!i", _read_exactly(peer, 4))
        assert size > 2 * BIG
        assert pickle.loads(_read_exactly(peer, size)) == message
        thread.join(STEP_TIMEOUT)


@pytest.mark.parametrize("duplex", [True, False])
def test_pipe_ends_exchange_out_of_band_frames(duplex: bool) -> None:
    reader, writer = hyperpipe.Pipe(duplex=duplex, transport="socket")
    with reader, writer:
        assert writer.statistics()["oob"] is True
        message = _message()
        thread = threading.Thread(target=writer.send, args=(message,), daemon=True)
        thread.start()
        got = reader.recv(timeout=STEP_TIMEOUT)
        thread.join(STEP_TIMEOUT)
        assert got == message


def test_recv_bytes_of_an_out_of_band_frame_is_an_ordinary_pickle() -> None:
    """A peer that asks for bytes gets a pickle of the same object (as the stdlib's would be)."""
    a, b = hyperpipe.Pipe(transport="socket")
    with a, b:
        message = _message()
        thread = threading.Thread(target=a.send, args=(message,), daemon=True)
        thread.start()
        data = b.recv_bytes(timeout=STEP_TIMEOUT)
        thread.join(STEP_TIMEOUT)
        assert pickle.loads(data) == message


def test_a_receive_timing_out_inside_an_out_of_band_frame_keeps_it() -> None:
    """Bytes trickle in one at a time, every call times out; the last one gets the object."""
    conn, peer = _raw_pair()
    with conn, peer:
        stream, buffers = _framing.dumps_oob(_message())
        wire = b"".join(bytes(v) for v in _framing.oob_views(stream, buffers))
        step = max(1, len(wire) // 40)
        for at in range(0, len(wire) - step, step):
            peer.sendall(wire[at : at + step])
            with pytest.raises(hyperpipe.TimeoutError):
                conn.recv(timeout=0)
        peer.sendall(wire[at + step :])
        assert conn.recv(timeout=STEP_TIMEOUT) == _message()


@pytest.mark.parametrize(
    "header, max_size, error",
    [
        (struct.pack("!iQI", -2, 10, _framing.MAX_OOB_BUFFERS + 1), None, hyperpipe.ProtocolError),
        (struct.pack("!iQI", -2, 2**63, 0), None, hyperpipe.ProtocolError),
        # no limit set: a part is reserved when its first byte is due (here, after the
        # 10-byte stream), and 2**62 bytes cannot be
        (struct.pack("!iQIQ", -2, 10, 1, 2**62) + b"s" * 10, None, hyperpipe.ProtocolError),
        (struct.pack("!iQIQ", -2, 10, 1, 10_000), 1000, hyperpipe.MessageTooLongError),
    ],
    ids=["too-many-buffers", "stream-length", "buffer-length", "over-max_message_size"],
)
def test_impossible_out_of_band_headers_break_the_connection(
    header: bytes, max_size: Any, error: type
) -> None:
    s1, s2 = socket.socketpair()
    conn = Connection(SocketTransport(sock=s1, max_message_size=max_size))
    with conn, s2:
        s2.sendall(header)
        with pytest.raises(error):
            conn.recv(timeout=STEP_TIMEOUT)
        with pytest.raises(OSError):  # and it stays broken: the stream cannot go on
            conn.recv(timeout=0)


def test_only_the_listener_and_client_handshakes_announce() -> None:
    """Their challenge carries the tag after the 40 random bytes (the stdlib MACs it all);
    deliver_challenge, which may run on any connection object, does not announce."""
    for steps, announced in [
        (_auth.server_handshake(KEY), True),
        (_auth.deliver_steps(KEY), False),
    ]:
        challenge = steps.send(None)
        assert challenge.startswith(b"#CHALLENGE#{sha256}")
        message = challenge[len(b"#CHALLENGE#{sha256}") :]
        assert message.endswith(_auth.OOB_TAG) is announced
        assert len(message) == _auth.MESSAGE_LENGTH + announced * len(_auth.OOB_TAG)


def test_the_handshake_reader_refuses_out_of_band_frames() -> None:
    reader = _auth.handshake_frame_reader()
    target = reader.target()
    target[:] = struct.pack("!i", _framing.OOB_MARK)
    with pytest.raises(hyperpipe.AuthenticationError):
        _auth.advance_handshake_reader(reader, 4)


# -- Listener/Client: negotiated in the handshake ------------------------------------------


def _served(listener: Any, serve: Callable[[Any], Any]) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            with listener.accept() as conn:
                outcome.append(serve(conn))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _echo(conn: Any) -> Any:
    got = conn.recv()
    conn.send(got)
    return got, conn.statistics()["oob"] if hasattr(conn, "statistics") else None


@pytest.mark.parametrize("authkey", [None, KEY], ids=["no-key", "key"])
def test_hyperpipe_peers_negotiate_with_a_key(family: str, address_for: Any, authkey: Any) -> None:
    with Listener(address_for(family), authkey=authkey) as listener:
        thread, outcome = _served(listener, _echo)
        with Client(listener.address, authkey=authkey, timeout=STEP_TIMEOUT) as conn:
            conn.send(_message())
            assert conn.recv(timeout=STEP_TIMEOUT) == _message()
            client_oob = conn.statistics()["oob"]
        thread.join(STEP_TIMEOUT)
        (got, server_oob), = outcome
        assert got == _message()
        assert client_oob is server_oob is (authkey is not None)


@pytest.mark.parametrize("authkey", [None, KEY], ids=["no-key", "key"])
def test_a_stdlib_listener_gets_ordinary_frames(
    family: str, address_for: Any, authkey: Any
) -> None:
    with mpc.Listener(address_for(family), authkey=authkey) as listener:
        thread, outcome = _served(listener, _echo)
        with Client(listener.address, authkey=authkey, timeout=STEP_TIMEOUT) as conn:
            assert conn.statistics()["oob"] is False
            conn.send(_message())
            assert conn.recv(timeout=STEP_TIMEOUT) == _message()
        thread.join(STEP_TIMEOUT)
        assert outcome[0][0] == _message()


@pytest.mark.parametrize("authkey", [None, KEY], ids=["no-key", "key"])
def test_a_stdlib_client_gets_ordinary_frames(family: str, address_for: Any, authkey: Any) -> None:
    with Listener(address_for(family), authkey=authkey) as listener:
        thread, outcome = _served(listener, _echo)
        with mpc.Client(listener.address, authkey=authkey) as conn:
            conn.send(_message())
            assert conn.recv() == _message()
        thread.join(STEP_TIMEOUT)
        (got, server_oob), = outcome
        assert got == _message() and server_oob is False


def test_an_asyncio_server_reads_what_a_client_sends_out_of_band(
    family: str, address_for: Any
) -> None:
    """hyperpipe.asyncio.serve announces (its handshake is _auth's) and reads the frames."""
    import asyncio

    from hyperpipe.asyncio import serve

    async def main() -> None:
        async def echo(aconn: Any) -> None:
            await aconn.send(await aconn.recv())

        server = await serve(echo, address_for(family), authkey=KEY)
        try:

            def client() -> Any:
                with Client(server.address, authkey=KEY, timeout=STEP_TIMEOUT) as conn:
                    conn.send(_message())
                    return conn.statistics()["oob"], conn.recv(timeout=STEP_TIMEOUT)

            oob, echoed = await asyncio.wait_for(asyncio.to_thread(client), STEP_TIMEOUT)
        finally:
            server.close()
            await server.wait_closed()
        assert oob is True
        assert echoed == _message()

    asyncio.run(main())
