"""The first try of an awaited send/receive on shared memory (one C call, a short spin).

``AsyncConnection`` first tries ``aio_try_send_bytes`` / ``aio_try_recv_bytes`` of the C core
for ``send_bytes(buf)``, ``recv_bytes()`` and ``recv()``; whatever they do not do goes the
general way (a non-blocking attempt through the Connection, then the loop's readiness).
These tests check both sides of that split, and the adaptive spin (docs/asyncio.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import types

import pytest

from impls import make_impl

import hyperpipe
from hyperpipe import asyncio as hp_asyncio
from hyperpipe.asyncio import AsyncConnection

from aio_support import LOOPS, STEP, loop_factory_for
from aio_support import run as run_on


@pytest.fixture
def impl():
    impl = make_impl("hyperpipe-shm")
    if hp_asyncio._try_recv_bytes is None:
        pytest.skip("the C core has no aio_try_* functions")
    return impl


@pytest.fixture(params=LOOPS)
def run(request):
    factory = loop_factory_for(request.param)
    return lambda fn, *args: run_on(factory, fn(*args))


@pytest.fixture
def duplex(impl):
    with contextlib.ExitStack() as ends:
        yield tuple(ends.enter_context(contextlib.closing(end)) for end in hp_asyncio.open_pipe(transport="shm"))


def _no_general_way(*args, **kwargs):
    raise AssertionError("the general way was taken")


def test_small_messages_go_in_one_c_call(run, duplex, monkeypatch):
    a, b = duplex
    for end in (a, b):
        monkeypatch.setattr(end, "_sending", _no_general_way)
        monkeypatch.setattr(end, "_receiving", _no_general_way)

    async def main():
        await a.send_bytes(b"ping")
        assert await b.recv_bytes() == b"ping"
        b.connection.send((1, "two"))  # recv() unpickles what the first try got
        return await a.recv()

    assert run(main) == (1, "two")


@pytest.mark.parametrize(
    "case",
    ["big bytes", "offset and size", "maxlength", "timeout", "object with a big buffer", "eof"],
)
def test_what_the_first_try_does_not_do_goes_the_general_way(run, duplex, case):
    a, b = duplex
    big = bytes(range(256)) * 4096  # 1 MiB: out of band, not inline

    async def main():
        if case == "big bytes":
            await a.send_bytes(big)
            return await b.recv_bytes() == big
        if case == "offset and size":
            await a.send_bytes(b"0123456789", 2, 3)
            return await b.recv_bytes() == b"234"
        if case == "maxlength":
            await a.send_bytes(b"x" * 100)
            with pytest.raises(OSError):
                await b.recv_bytes(10)
            return True
        if case == "timeout":
            await a.send_bytes(b"t", timeout=1.0)
            assert await b.recv_bytes(timeout=1.0) == b"t"
            with pytest.raises(hyperpipe.TimeoutError):
                await b.recv_bytes(timeout=0.01)
            return True
        if case == "object with a big buffer":
            await a.send({"k": big})
            return await b.recv() == {"k": big}
        a.close()
        with pytest.raises(EOFError):
            await b.recv_bytes()
        with pytest.raises(EOFError):
            await b.recv()
        return True

    assert run(main) is True


def test_wrong_direction_is_refused_not_sent(run, impl):
    reader, writer = impl.Pipe(duplex=False)

    async def main():
        async with AsyncConnection(reader) as r, AsyncConnection(writer) as w:
            with pytest.raises(OSError):
                await r.send_bytes(b"no")
            with pytest.raises(OSError):
                await w.recv_bytes()
            with pytest.raises(OSError):
                await w.recv()
            await w.send_bytes(b"yes")
            assert await r.recv_bytes() == b"yes"
            assert not r.connection.poll(0)

    run(main)


def test_closed_end_raises_as_the_connection(run, duplex):
    a, b = duplex
    a.close()

    async def main():
        for call in (lambda: a.send_bytes(b"x"), a.recv_bytes, a.recv):
            with pytest.raises(OSError):
                await call()

    run(main)


def test_a_reply_from_a_thread_of_this_process_is_caught(run, impl):
    """The spin releases the GIL: a peer thread can answer while the loop spins."""
    ours, theirs = impl.Pipe()

    def echo():
        try:
            while True:
                theirs.send_bytes(theirs.recv_bytes())
        except EOFError:
            pass

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()

    async def main():
        async with AsyncConnection(ours) as conn:
            for i in range(2000):
                await conn.send_bytes(b"%d" % i)
                assert await conn.recv_bytes() == b"%d" % i

    try:
        run(main)
    finally:
        ours.close()
        thread.join(STEP)
        theirs.close()
    assert not thread.is_alive()


def test_the_spin_shrinks_while_messages_come_late_and_grows_back(run, duplex, monkeypatch):
    """The policy, on a clock that says how long each general-way wait took."""
    a, b = duplex
    clock = types.SimpleNamespace(now=0.0, wait=0.0)

    def perf_counter():
        clock.now += clock.wait / 2  # read twice per wait: before and after it
        return clock.now

    monkeypatch.setattr(hp_asyncio, "time", types.SimpleNamespace(perf_counter=perf_counter))

    async def reply(after):
        async def send_later():
            await asyncio.sleep(0)
            await a.send_bytes(b"late")

        clock.wait = after
        task = asyncio.ensure_future(send_later())
        assert await b.recv_bytes() == b"late"  # nothing waits: the general way
        await task

    async def main():
        assert b._spin == hp_asyncio._SPIN_MAX
        await reply(after=0.005)
        assert b._spin == hp_asyncio._SPIN_MAX / 2
        for _ in range(10):
            await reply(after=0.002)
        assert b._spin == 0.0  # an idle connection no longer blocks the loop at all
        await reply(after=1e-6)  # came soon: grows back from the least
        assert b._spin == hp_asyncio._SPIN_MIN
        for _ in range(10):
            await reply(after=1e-6)
        return b._spin

    assert run(main) == hp_asyncio._SPIN_MAX
