"""Peer death: complete messages first, then EOF / BrokenPipe; nothing leaks; idle costs nothing."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import time
from typing import Any

import pytest
from shm_helpers import dev_shm_entries, join_or_kill

import hyperpipe
from hyperpipe._shm_transport import shm_pipe

MiB = 1 << 20


def _checked(i: int, size: int) -> bytes:
    body = (i.to_bytes(4, "little") * (size // 4 + 1))[:size]
    return hashlib.blake2b(body, digest_size=8).digest() + body


def _verify(frame: Any) -> int:
    data = bytes(frame)
    digest, body = data[:8], data[8:]
    assert hashlib.blake2b(body, digest_size=8).digest() == digest, "corrupt message delivered"
    return int.from_bytes(body[:4], "little") if len(body) >= 4 else -1


def _streamer(reduced: tuple, seed: int) -> None:
    rebuild, args = reduced
    t = rebuild(*args)
    rng = random.Random(seed)
    t.send_frame(memoryview(b"ready"), None)
    i = 0
    while True:  # until killed
        size = rng.choice([4, 100, 5000, 70_000, 300_000, 3 * MiB])
        t.send_frame(memoryview(_checked(i, size)), None)
        i += 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_mid_stream_delivers_complete_messages_then_eof(seed: int, resources: Any) -> None:
    a, b = shm_pipe(True, ring_size=1 << 16)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_streamer, args=(b.reduce(), seed))
    p.start()
    b.close()
    try:
        assert a.recv_frame(None, time.monotonic() + 30) == b"ready"
        rng = random.Random(seed)
        expected = 0
        for _ in range(rng.randrange(5, 60)):  # read a little, then kill at a random point
            assert _verify(a.recv_frame(None, time.monotonic() + 30)) == expected
            expected += 1
        time.sleep(rng.random() * 0.05)
        os.kill(p.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        p.join(30)
        with pytest.raises(EOFError):
            while True:  # every complete message, in order, then EOF (never a timeout)
                assert _verify(a.recv_frame(None, time.monotonic() + 10)) == expected
                expected += 1
        detected = time.monotonic() - killed_at
        print(f"EOF {detected * 1000:.1f} ms after SIGKILL, {expected} messages")
        with pytest.raises(EOFError):
            a.recv_frame(None, time.monotonic() + 10)  # stays at EOF
    finally:
        join_or_kill(p)
        a.close()
    resources.assert_released()


def _sleeper(reduced: tuple) -> None:
    rebuild, args = reduced
    t = rebuild(*args)
    t.send_frame(memoryview(b"up"), None)
    t.recv_frame(None, None)  # blocks until killed


def test_send_to_killed_peer_raises_broken_pipe(resources: Any) -> None:
    a, b = shm_pipe(True)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_sleeper, args=(b.reduce(),))
    p.start()
    b.close()
    try:
        assert a.recv_frame(None, time.monotonic() + 30) == b"up"
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        with pytest.raises(hyperpipe.BrokenPipeError):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                a.send_frame(memoryview(b"anyone?"), None)
                time.sleep(0.001)
        with pytest.raises(BrokenPipeError):  # big ones too, and it stays broken
            a.send_frame(memoryview(b"x" * (2 * MiB)), None)
        with pytest.raises(EOFError):
            a.recv_frame(None, time.monotonic() + 10)
    finally:
        join_or_kill(p)
        a.close()
    resources.assert_released()


def test_sender_blocked_on_full_ring_sees_death() -> None:
    a, b = shm_pipe(True, ring_size=4096)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_sleeper, args=(b.reduce(),))
    p.start()
    b.close()
    try:
        assert a.recv_frame(None, time.monotonic() + 30) == b"up"
        os.kill(p.pid, signal.SIGKILL)
        with pytest.raises(hyperpipe.BrokenPipeError):
            for _ in range(10_000):  # fills the ring, then waits for space that never comes
                a.send_frame(memoryview(b"f" * 1000), time.monotonic() + 10)
    finally:
        join_or_kill(p)
        a.close()


def _idle_receiver(reduced: tuple) -> None:
    rebuild, args = reduced
    t = rebuild(*args)
    t.send_frame(memoryview(b"up"), None)
    t.recv_frame(None, None)  # idle until the parent sends
    t.send_object(os.times(), None)


def test_idle_receiver_sleeps() -> None:
    a, b = shm_pipe(True)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_idle_receiver, args=(b.reduce(),))
    p.start()
    b.close()
    try:
        assert a.recv_frame(None, time.monotonic() + 30) == b"up"
        with open(f"/proc/{p.pid}/stat") as f:
            before = f.read().rsplit(")", 1)[1].split()
        time.sleep(1.0)
        with open(f"/proc/{p.pid}/stat") as f:
            after = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        # utime, stime are fields 14 and 15 of stat (11 and 12 after the comm field)
        cpu = (int(after[11]) + int(after[12]) - int(before[11]) - int(before[12])) / ticks
        assert cpu <= 0.05, f"idle receiver used {cpu:.2f} s of CPU in 1 s"
        a.send_frame(memoryview(b"go"), None)
        a.recv_object(time.monotonic() + 30)
    finally:
        join_or_kill(p)
        a.close()


def _object_streamer(reduced: tuple) -> None:
    np = __import__("numpy")
    rebuild, args = reduced
    t = rebuild(*args)
    t.send_frame(memoryview(b"ready"), None)
    i = 0
    while True:
        t.send_object((i, np.full(MiB // 8 * (1 + i % 3), float(i))), None)
        i += 1


def test_sigkill_while_sending_buffers_leaks_nothing(resources: Any) -> None:
    np = pytest.importorskip("numpy")
    before_shm = dev_shm_entries()
    for round_ in range(4):
        a, b = shm_pipe(True, max_inflight_fds=4)
        ctx = multiprocessing.get_context("fork")
        p = ctx.Process(target=_object_streamer, args=(b.reduce(),))
        p.start()
        b.close()
        try:
            assert a.recv_frame(None, time.monotonic() + 30) == b"ready"
            for _ in range(round_ * 3):
                i, arr = a.recv_object(time.monotonic() + 30)
                assert arr[0] == float(i) and arr[-1] == float(i)
            time.sleep(0.01 * round_)
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
            with pytest.raises(EOFError):
                while True:
                    i, arr = a.recv_object(time.monotonic() + 10)
                    assert isinstance(arr, np.ndarray) and arr[-1] == float(i)
                    del arr
        finally:
            join_or_kill(p)
            a.close()
    resources.assert_released()
    assert dev_shm_entries() <= before_shm
