"""Opt-in stress runs (-m stress): random sizes both ways at once, many pipes, random kills."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import time
from typing import Any

import pytest
from shm_helpers import join_or_kill

from hyperpipe._shm_transport import shm_pipe

pytestmark = pytest.mark.stress

MiB = 1 << 20
SIZES = [0, 1, 8, 100, 4096, 65535, 65536, 1 * MiB, 5 * MiB, 64 * MiB]


def _message(rng: random.Random, i: int) -> bytes:
    size = rng.choice(SIZES)
    body = rng.randbytes(min(size, 4096)) * (size // 4096 + 1)
    body = i.to_bytes(4, "little") + body[: max(size - 4, 0)]
    return hashlib.blake2b(body, digest_size=16).digest() + body


def _check(frame: Any) -> int:
    data = bytes(frame)
    assert hashlib.blake2b(data[16:], digest_size=16).digest() == data[:16]
    return int.from_bytes(data[16:20], "little")


def _both_ways(reduced: tuple, seed: int, count: int) -> None:
    rebuild, args = reduced
    t = rebuild(*args)
    rng = random.Random(seed)
    sent = received = 0
    pending = None
    while sent < count or received < count:
        if received < count and t.poll(0):
            assert _check(t.recv_frame(None, time.monotonic() + 120)) == received
            received += 1
        elif sent < count:
            if pending is None:
                pending = _message(rng, sent)
            try:  # both sides may be sending: a timed-out send left nothing, retry later
                t.send_frame(memoryview(pending), time.monotonic() + 0.05)
            except TimeoutError:
                continue
            pending = None
            sent += 1
        else:
            assert _check(t.recv_frame(None, time.monotonic() + 120)) == received
            received += 1
    t.close()


def test_random_sizes_both_ways_checksummed() -> None:
    count = 300
    a, b = shm_pipe(True, max_inflight_bytes=256 * MiB)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_both_ways, args=(b.reduce(), 1, count))
    p.start()
    b.close()
    try:
        _both_ways((lambda t: t, (a,)), 2, count)
    finally:
        assert join_or_kill(p, 600) == 0


def _echo_all(reduced: tuple) -> None:
    rebuild, args = reduced
    t = rebuild(*args)
    # not EOF: under fork each child also holds copies of the parent's ends
    while (frame := bytes(t.recv_frame(None, None))) != b"stop":
        t.send_frame(memoryview(frame), None)


def test_many_pipes_at_once() -> None:
    ctx = multiprocessing.get_context("fork")
    pipes = [shm_pipe(True) for _ in range(64)]
    procs = []
    for a, b in pipes:
        p = ctx.Process(target=_echo_all, args=(b.reduce(),))
        p.start()
        procs.append(p)
        b.close()
    rng = random.Random(3)
    try:
        for round_ in range(20):
            for i, (a, _) in enumerate(pipes):
                a.send_frame(memoryview(_message(rng, round_ * 1000 + i)), None)
            for i, (a, _) in enumerate(pipes):
                assert _check(a.recv_frame(None, time.monotonic() + 60)) == round_ * 1000 + i
    finally:
        for a, _ in pipes:
            a.send_frame(memoryview(b"stop"), None)
            a.close()
        for p in procs:
            join_or_kill(p, 60)


def _spam(reduced: tuple) -> None:
    rebuild, args = reduced
    t = rebuild(*args)
    rng = random.Random(os.getpid())
    i = 0
    while True:
        t.send_frame(memoryview(_message(rng, i)), None)
        i += 1


def test_random_kills() -> None:
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(4)
    for _ in range(30):
        a, b = shm_pipe(True)
        p = ctx.Process(target=_spam, args=(b.reduce(),))
        p.start()
        b.close()
        # Killed only once it sends: b.reduce() outside a process start hands its descriptors
        # over through the resource sharer, whose copies stay with us until the child takes
        # them, so a child killed before that (a loaded machine) would leave b open here.
        assert a.poll(time.monotonic() + 30)
        time.sleep(rng.random() * 0.2)
        os.kill(p.pid, signal.SIGKILL)
        expected = 0
        with pytest.raises(EOFError):
            while True:
                assert _check(a.recv_frame(None, time.monotonic() + 30)) == expected
                expected += 1
        join_or_kill(p)
        a.close()
