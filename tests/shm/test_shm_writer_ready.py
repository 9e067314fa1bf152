"""The "room to write" descriptor of the shm core: Endpoint.writer_fileno() / arm_writer().

For event loops: a send that would block arms the endpoint, the loop waits for the
descriptor, and sends again. Readiness may be spurious, never missing.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import threading
import time
from typing import Any

import pytest
from shm_helpers import join_or_kill

import hyperpipe

MSG = b"m" * 100


def _endpoint(conn: Any) -> Any:
    return conn._transport._ep


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def _fill(conn: Any) -> int:
    """Send until a 100-byte message no longer fits: the end is then armed."""
    ep = _endpoint(conn)
    sent = 0
    while ep.arm_writer(len(MSG)):
        conn.send_bytes(MSG)
        sent += 1
    return sent


def _watchers() -> int:
    """Watcher threads of this process (the C core names them)."""
    n = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                n += f.read().strip() == "hp-room-watch"
        except OSError:
            pass  # the thread ended meanwhile
    return n


def _drain(conn: Any, count: int) -> None:
    for _ in range(count):
        assert conn.recv_bytes() == MSG


def test_readable_once_the_reader_frees_space() -> None:
    reader, writer = hyperpipe.Pipe(False, transport="shm", ring_size=4096)
    sent = _fill(writer)
    fd = _endpoint(writer).writer_fileno()
    assert sent > 0 and not _readable(fd, 0.1)  # full: nothing to wake for
    proc = multiprocessing.get_context("fork").Process(target=_drain, args=(reader, sent))
    proc.start()
    try:
        assert _readable(fd, 10)
        assert _endpoint(writer).arm_writer(len(MSG))  # fits now: nothing armed
    finally:
        assert join_or_kill(proc) == 0
    # arming again clears what is left of that readiness
    assert _fill(writer) > 0
    assert not _readable(fd, 0.1)
    _drain(reader, 1)  # from this process, in a thread's stead: the watcher wakes all the same
    assert _readable(fd, 10)
    reader.close()
    writer.close()


def test_armed_for_an_out_of_band_size() -> None:
    reader, writer = hyperpipe.Pipe(False, transport="shm", ring_size=4096, max_inflight_fds=1, heap_size=0)
    writer.send_bytes(b"o" * 200_000)  # a memfd in flight: the cap is reached
    ep = _endpoint(writer)
    assert not ep.arm_writer(200_000)
    fd = ep.writer_fileno()
    assert not _readable(fd, 0.1)
    assert reader.recv_bytes() == b"o" * 200_000
    assert _readable(fd, 10)
    reader.close()
    writer.close()


@pytest.mark.parametrize("how", ["close this end", "peer closes"])
def test_readable_when_closed_or_the_peer_is_gone(how: str) -> None:
    watchers = _watchers()
    reader, writer = hyperpipe.Pipe(False, transport="shm", ring_size=4096)
    _fill(writer)
    fd = _endpoint(writer).writer_fileno()
    assert _watchers() == watchers + 1
    if how == "peer closes":
        timer = threading.Timer(0.1, reader.close)
        timer.start()
        assert _readable(fd, 10)
        timer.join()
        with pytest.raises(BrokenPipeError):
            writer.send_bytes(MSG * 50)
        writer.close()
    else:
        ep = _endpoint(writer)  # close() lets go of the transport
        timer = threading.Timer(0.1, writer.close)
        timer.start()
        assert _readable(fd, 10)
        timer.join()
        with pytest.raises(OSError):
            ep.arm_writer(1)
        reader.close()
    deadline = time.monotonic() + 5
    while _watchers() > watchers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _watchers() == watchers  # joined


def test_no_watcher_until_a_send_would_block() -> None:
    watchers = _watchers()
    reader, writer = hyperpipe.Pipe(False, transport="shm")
    ep = _endpoint(writer)
    assert ep.arm_writer(100) and ep.arm_writer(10 << 20)
    assert not _readable(ep.writer_fileno(), 0)
    assert _watchers() == watchers
    with pytest.raises(OSError, match="read-only"):
        _endpoint(reader).arm_writer(1)
    reader.close()
    writer.close()
