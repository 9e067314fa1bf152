"""``hyperpipe.asyncio.connect`` / ``serve``: the asynchronous Client and Listener.

Loopback and private Unix sockets only. Interoperates with the synchronous hyperpipe and
standard-library ``Client``/``Listener`` (run in threads), with authkey and TLS. The fixture
is named ``impl`` (socket transport only: these are sockets) so that the suite's guard
applies: a SIGALRM watchdog and the file-descriptor leak check.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing.connection
import os
import shutil
import socket
import ssl
import subprocess

import pytest

from impls import make_impl

import hyperpipe
from hyperpipe.asyncio import AsyncConnection, connect, serve

from aio_support import LOOPS, STEP, loop_factory_for
from aio_support import run as run_on

KEY = b"secret key"


@pytest.fixture
def impl():
    return make_impl("hyperpipe-socket")


@pytest.fixture(params=LOOPS)
def run(request):
    factory = loop_factory_for(request.param)
    return lambda fn, *args: run_on(factory, asyncio.wait_for(fn(*args), STEP * 2))


@pytest.fixture(params=["AF_INET", "AF_UNIX"])
def address(request, tmp_path):
    if request.param == "AF_INET":
        return ("127.0.0.1", 0)
    return str(tmp_path / "server.sock")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(server context, client context, client context trusting another CA)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    for name in ("good", "other"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            cwd=d, check=True, capture_output=True, timeout=60,
        )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(d / "good.pem", d / "good.key")
    client = ssl.create_default_context(cafile=str(d / "good.pem"))
    stranger = ssl.create_default_context(cafile=str(d / "other.pem"))
    return server, client, stranger


async def doubler(aconn):
    async for message in aconn:
        await aconn.send(message * 2)


async def round_trips(aconn, count=5):
    results = []
    for i in range(count):
        await aconn.send(i)
        results.append(await aconn.recv())
    return results


def in_thread(fn, *args):
    """Run a blocking call off the loop (the loop must keep serving meanwhile)."""
    return asyncio.wait_for(asyncio.to_thread(fn, *args), STEP)


# -- connect and serve --------------------------------------------------------------------


@pytest.mark.parametrize("authkey", [None, KEY])
def test_connect_to_serve(impl, run, address, authkey):
    async def main():
        async with await serve(doubler, address, authkey=authkey) as server:
            async with await connect(server.address, authkey=authkey) as aconn:
                assert isinstance(aconn, AsyncConnection)
                return await round_trips(aconn)

    assert run(main) == [0, 2, 4, 6, 8]
    if isinstance(address, str):
        assert not os.path.exists(address), "the Unix socket file was not removed"


@pytest.mark.parametrize("client", ["hyperpipe", "multiprocessing"])
def test_sync_clients_talk_to_serve(impl, run, address, client):
    Client = hyperpipe.Client if client == "hyperpipe" else multiprocessing.connection.Client

    def talk(addr):
        with Client(addr, authkey=KEY) as conn:
            conn.send("ab")
            if not conn.poll(STEP):
                raise RuntimeError("no reply")
            return conn.recv()

    async def main():
        async with await serve(doubler, address, authkey=KEY) as server:
            return await in_thread(talk, server.address)

    assert run(main) == "abab"


@pytest.mark.parametrize("listener", ["hyperpipe", "multiprocessing"])
def test_connect_to_sync_listeners(impl, run, address, listener):
    Listener = hyperpipe.Listener if listener == "hyperpipe" else multiprocessing.connection.Listener

    def answer(lst):
        with lst.accept() as conn:
            if not conn.poll(STEP):
                raise RuntimeError("no request")
            conn.send(("got", conn.recv()))

    async def main():
        with Listener(address, authkey=KEY) as lst:
            answering = asyncio.ensure_future(in_thread(answer, lst))
            async with await connect(lst.address, authkey=KEY) as aconn:
                await aconn.send("hello")
                reply = await asyncio.wait_for(aconn.recv(), STEP)
            await answering
            return reply

    assert run(main) == ("got", "hello")


def test_wrong_key_is_refused_and_the_server_keeps_serving(impl, run, caplog):
    async def main():
        async with await serve(doubler, ("127.0.0.1", 0), authkey=KEY) as server:
            with pytest.raises(hyperpipe.AuthenticationError):
                await connect(server.address, authkey=b"wrong")
            async with await connect(server.address, authkey=KEY) as aconn:
                result = await round_trips(aconn, 2)
            return result, server.refused

    with caplog.at_level(logging.WARNING, logger="hyperpipe.asyncio"):
        result, refused = run(main)
    assert result == [0, 2]
    assert refused == 1
    assert "refused client" in caplog.text


def test_key_on_the_client_only_times_out_in_the_handshake(impl, run):
    async def main():
        async with await serve(doubler, ("127.0.0.1", 0)) as server:
            with pytest.raises(hyperpipe.TimeoutError):
                await connect(server.address, authkey=KEY, handshake_timeout=0.2)

    run(main)


def test_a_silent_client_holds_up_nobody_and_is_dropped(impl, run):
    async def main():
        async with await serve(
            doubler, ("127.0.0.1", 0), authkey=KEY, handshake_timeout=0.3
        ) as server:
            silent = socket.create_connection(server.address)
            try:
                async with await connect(server.address, authkey=KEY) as aconn:
                    assert await round_trips(aconn, 2) == [0, 2]
                silent.settimeout(STEP)
                heard = await asyncio.to_thread(read_to_eof, silent)
            finally:
                silent.close()
            return heard, server.refused

    heard, refused = run(main)
    # the server sent its challenge, then closed the silent client after handshake_timeout
    assert heard.startswith(b"\x00\x00\x00") and b"#CHALLENGE#" in heard
    assert refused == 1


def read_to_eof(sock):
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def test_tls_with_authkey_both_ways(impl, run, tls):
    server_ctx, client_ctx, _ = tls

    def sync_client(addr):
        with hyperpipe.Client(addr, authkey=KEY, ssl_context=client_ctx) as conn:
            conn.send([1])
            if not conn.poll(STEP):
                raise RuntimeError("no reply")
            return conn.recv()

    async def main():
        async with await serve(
            doubler, ("127.0.0.1", 0), authkey=KEY, ssl_context=server_ctx
        ) as server:
            async with await connect(
                server.address, authkey=KEY, ssl_context=client_ctx
            ) as aconn:
                big = os.urandom(3 << 20)
                await aconn.send(big)
                big_ok = await aconn.recv() == big * 2
                small = await round_trips(aconn, 3)
            from_sync = await in_thread(sync_client, server.address)
            return big_ok, small, from_sync

    assert run(main) == (True, [0, 2, 4], [1, 1])


def test_tls_connect_to_a_sync_tls_listener(impl, run, tls):
    server_ctx, client_ctx, _ = tls

    def answer(lst):
        with lst.accept() as conn:
            if not conn.poll(STEP):
                raise RuntimeError("no request")
            conn.send(conn.recv() + 1)

    async def main():
        with hyperpipe.Listener(("127.0.0.1", 0), authkey=KEY, ssl_context=server_ctx) as lst:
            answering = asyncio.ensure_future(in_thread(answer, lst))
            async with await connect(lst.address, authkey=KEY, ssl_context=client_ctx) as aconn:
                await aconn.send(41)
                reply = await asyncio.wait_for(aconn.recv(), STEP)
            await answering
            return reply

    assert run(main) == 42


def test_tls_untrusted_server_is_refused(impl, run, tls):
    server_ctx, _, stranger_ctx = tls

    async def main():
        async with await serve(doubler, ("127.0.0.1", 0), ssl_context=server_ctx) as server:
            with pytest.raises(ssl.SSLError):
                await connect(server.address, ssl_context=stranger_ctx)
            return server

    server = run(main)
    assert not server.is_serving()


def test_fifty_clients_served_at_once(impl, run, address):
    async def main():
        async with await serve(doubler, address, authkey=KEY) as server:
            clients = await asyncio.gather(
                *(connect(server.address, authkey=KEY) for _ in range(50))
            )
            try:
                return await asyncio.gather(*(round_trips(c, 10) for c in clients))
            finally:
                for c in clients:
                    c.close()

    assert run(main) == [[2 * i for i in range(10)]] * 50


def test_failing_handler_is_logged_and_the_server_goes_on(impl, run, caplog):
    async def handler(aconn):
        request = await aconn.recv()
        if request == "fail":
            raise RuntimeError("handler exploded")
        await aconn.send("fine")

    async def main():
        async with await serve(handler, ("127.0.0.1", 0)) as server:
            async with await connect(server.address) as bad:
                await bad.send("fail")
                with pytest.raises(EOFError):
                    await asyncio.wait_for(bad.recv(), STEP)
            async with await connect(server.address) as good:
                await good.send("ok")
                return await asyncio.wait_for(good.recv(), STEP)

    with caplog.at_level(logging.ERROR, logger="hyperpipe.asyncio"):
        assert run(main) == "fine"
    assert "handler exploded" in caplog.text


def test_leaving_the_server_cancels_running_handlers(impl, run):
    started = []

    async def handler(aconn):
        started.append(True)
        await asyncio.sleep(3600)

    async def main():
        async with await serve(handler, ("127.0.0.1", 0)) as server:
            client = await connect(server.address)
            while not started:
                await asyncio.sleep(0.005)
        try:
            # the handler was cancelled and its connection closed: the client sees EOF
            with pytest.raises(EOFError):
                await asyncio.wait_for(client.recv(), STEP)
        finally:
            client.close()
        return server.is_serving()

    assert run(main) is False


def test_connect_timeout_and_refused(impl, run, tmp_path):
    async def main():
        with pytest.raises(OSError):
            await connect(str(tmp_path / "nobody-listens-here"))
        with pytest.raises(TypeError):
            await connect(("127.0.0.1", 1), authkey="not bytes")

    run(main)


def test_no_key_on_the_client_gets_a_clear_authentication_error(impl, run):
    async def main():
        async with await serve(doubler, ("127.0.0.1", 0), authkey=KEY) as server:
            async with await connect(server.address) as aconn:
                with pytest.raises(hyperpipe.AuthenticationError):
                    await asyncio.wait_for(aconn.recv(), STEP)

    run(main)
