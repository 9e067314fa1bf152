"""hyperpipe.WaitSet: register once, wait many times (a hyperpipe extra beside wait())."""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from typing import Any, Iterator

import pytest

import hyperpipe
from hyperpipe import _select

TRANSPORTS = [t for t in ("shm", "socket") if t in _select.available_transports()]


@pytest.fixture
def pipes() -> Iterator[Any]:
    """Make pipes of any transport (and the stdlib's); all closed at the end."""
    made: list[Any] = []

    def make(kind: str) -> tuple[Any, Any]:
        pair = multiprocessing.Pipe() if kind == "stdlib" else hyperpipe.Pipe(transport=kind)
        made.extend(pair)
        return pair

    yield make
    for conn in made:
        conn.close()


def test_reports_exactly_the_ready_members_among_many(pipes: Any) -> None:
    kinds = [k for k in TRANSPORTS for _ in range(30)] + ["stdlib"] * 10
    pairs = [pipes(kind) for kind in kinds]
    with hyperpipe.WaitSet(a for a, _ in pairs) as waitset:
        assert len(waitset) == len(pairs)
        assert waitset.wait(0) == []
        chosen = [pairs[3], pairs[len(pairs) // 2], pairs[-1]]
        for i, (_, b) in enumerate(chosen):
            b.send(i)
        ready = waitset.wait(5)
        assert {id(c) for c in ready} == {id(a) for a, _ in chosen}
        for a, _ in chosen:
            a.recv()
        assert waitset.wait(0) == []  # nothing left: nothing reported, on every transport


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_eof_counts_as_ready(pipes: Any, transport: str) -> None:
    a, b = pipes(transport)
    with hyperpipe.WaitSet([a]) as waitset:
        b.close()
        assert waitset.wait(5) == [a]
        with pytest.raises(EOFError):
            a.recv()


def test_a_timeout_gives_an_empty_list_after_waiting(pipes: Any) -> None:
    a, _ = pipes(TRANSPORTS[0])
    with hyperpipe.WaitSet([a]) as waitset:
        start = time.monotonic()
        assert waitset.wait(0.05) == []
        assert time.monotonic() - start >= 0.045


@pytest.mark.skipif("shm" not in TRANSPORTS, reason="needs the shared-memory transport")
def test_a_stale_wake_up_is_not_reported_and_does_not_stay_readable(pipes: Any) -> None:
    # A wake-up count with nothing in the ring (a producer's late signal): the waitset
    # must not report the connection, and must not spin on it either.
    a, _ = pipes("shm")
    with hyperpipe.WaitSet([a]) as waitset:
        rx_efd = a._transport._ep.fds()[2]
        os.eventfd_write(rx_efd, 1)
        assert waitset.wait(0.05) == []
        assert waitset._selector.select(0) == []  # drained by the check


def test_sockets_and_process_sentinels(pipes: Any) -> None:
    s1, s2 = socket.socketpair()
    proc = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0.1,))
    proc.start()
    try:
        with hyperpipe.WaitSet([s1, proc.sentinel]) as waitset:
            assert waitset.wait(10) == [proc.sentinel]  # the child ended
            waitset.remove(proc.sentinel)
            s2.send(b"x")
            assert waitset.wait(5) == [s1]
    finally:
        proc.join()
        s1.close()
        s2.close()


def test_membership(pipes: Any) -> None:
    a, b = pipes(TRANSPORTS[0])
    c, _ = pipes("stdlib")
    waitset = hyperpipe.WaitSet()
    waitset.add(a)
    waitset.add(a)  # twice: still one member
    waitset.add(c)
    assert len(waitset) == 2 and a in waitset and b not in waitset
    assert {id(x) for x in waitset} == {id(a), id(c)}
    waitset.remove(c)
    with pytest.raises(KeyError):
        waitset.remove(c)
    waitset.discard(c)  # absent: nothing happens
    b.send("x")
    assert waitset.wait(5) == [a]
    waitset.close()
    waitset.close()  # twice: nothing happens
    assert "closed" in repr(waitset)
    with pytest.raises(ValueError):
        waitset.wait(0)
    with pytest.raises(ValueError):
        waitset.add(c)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_member_closed_in_the_set_is_dropped_and_its_descriptor_reusable(pipes: Any, transport: str) -> None:
    a, b = pipes(transport)
    waitset = hyperpipe.WaitSet([a])
    try:
        fd = a.fileno()
        a.close()
        b.close()
        assert waitset.wait(0.05) == []
        # A new object that gets the same descriptor number takes its place.
        r, w = os.pipe()
        try:
            if r != fd:
                os.dup2(r, fd)
                os.close(r)
                r = fd
            waitset.add(r)
            os.write(w, b"x")
            assert waitset.wait(5) == [r]
        finally:
            os.close(r)
            os.close(w)
    finally:
        waitset.close()


def test_close_from_another_thread_ends_a_blocked_wait(pipes: Any) -> None:
    a, _ = pipes(TRANSPORTS[0])
    waitset = hyperpipe.WaitSet([a])
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(waitset.wait(None)))
    thread.start()
    time.sleep(0.05)
    waitset.close()
    thread.join(10)
    assert not thread.is_alive() and result == [[]]
    assert "closed" in repr(waitset)


def test_two_live_objects_on_one_descriptor_are_refused(pipes: Any) -> None:
    a, _ = pipes(TRANSPORTS[0])
    with hyperpipe.WaitSet([a]) as waitset:
        with pytest.raises(ValueError):
            waitset.add(a.fileno())
