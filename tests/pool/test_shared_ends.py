"""One shared-memory pipe end shared by several processes under a cross-process lock, as
every multiprocessing queue shares its ends: ring indices, wake-up state, the out-of-band
heap and its reference counts, and the per-process state of each copy must hold up.

Producers send tagged items of mixed sizes (inline, and out of band through the heap);
consumers receive under one lock while another process asks ``poll()`` with no lock (what
``Queue.empty()`` does). Every item must arrive once, whole, in each producer's order.
"""

from __future__ import annotations

import multiprocessing
import os
import zlib

import pytest

import hyperpipe

TIMEOUT = 60.0
#: inline frames, a frame just under the out-of-band threshold, heap blocks
SIZES = [0, 40, 3000, 65_000, 70_000, 600_000]


def _payload(tag: int, i: int) -> bytes:
    n = SIZES[(tag + i) % len(SIZES)]
    return bytes([(tag * 31 + i) % 251]) * n


def _produce(writer, wlock, tag, count, use_send):
    for i in range(count):
        item = (tag, i, _payload(tag, i))
        with wlock:
            if use_send:
                writer.send(item)
            else:
                writer.send_bytes(multiprocessing.reduction.ForkingPickler.dumps(item))


def _consume(reader, rlock, results, stop_tag):
    seen = []
    while True:
        with rlock:
            item = reader.recv(timeout=TIMEOUT)
        if item == stop_tag:
            break
        tag, i, payload = item
        if payload != _payload(tag, i):
            results.put(("corrupt", os.getpid(), tag, i, zlib.crc32(payload)))
            return
        seen.append((tag, i))
    results.put(("ok", os.getpid(), seen))


def _poll_unlocked(reader, stop):
    # As Queue.empty() does: no lock, beside consumers in other processes. A successful
    # poll() that kept the wake token left a consumer asleep in recv() in another process
    # unwoken (4 x 4 x 1,000 items hung) until poll() left the token armed.
    while not stop.is_set():
        reader.poll()


def _run(method, producers, consumers, count, procs):
    ctx = multiprocessing.get_context(method)
    reader, writer = hyperpipe.Pipe(duplex=False, transport="shm")
    rlock, wlock = ctx.Lock(), ctx.Lock()
    results = ctx.SimpleQueue()
    stop = ctx.Event()
    children = [procs.start(ctx, _produce, writer, wlock, tag, count, tag % 2 == 0)
                for tag in range(producers)]
    consumers_ = [procs.start(ctx, _consume, reader, rlock, results, "stop") for _ in range(consumers)]
    procs.start(ctx, _poll_unlocked, reader, stop)
    for p in children:
        p.join(TIMEOUT)
        assert p.exitcode == 0
    for _ in consumers_:
        with wlock:
            writer.send("stop")
    reports = [results.get() for _ in consumers_]
    stop.set()
    reader.close()
    writer.close()
    assert [r for r in reports if r[0] != "ok"] == []
    everything = sorted(item for _, _, seen in reports for item in seen)
    assert everything == [(tag, i) for tag in range(producers) for i in range(count)]
    for _, _, seen in reports:
        for tag in range(producers):
            mine = [i for t, i in seen if t == tag]
            assert mine == sorted(mine)
    results.close()


def _send_forever(writer, tag):
    i = 0
    while True:
        writer.send((tag, i, _payload(tag, i)))
        i += 1


def test_a_producer_killed_mid_item_corrupts_nothing(procs):
    # No lock here: a process killed while holding a queue's lock (a SemLock) blocks that
    # queue for the others, with the stdlib as with hyperpipe. What the ring adds: an item
    # is published whole or not at all, so the next producer's items arrive intact.
    ctx = multiprocessing.get_context("fork")
    reader, writer = hyperpipe.Pipe(duplex=False, transport="shm")
    for round_ in range(5):
        victim = procs.start(ctx, _send_forever, writer, 0)
        first = reader.recv(timeout=TIMEOUT)
        os.kill(victim.pid, 9)  # mid-copy or mid-wait for space, whatever it was doing
        victim.join(TIMEOUT)
        last = first[1]
        while reader.poll(0.2):
            tag, i, payload = reader.recv(timeout=TIMEOUT)
            assert (tag, i) == (0, last + 1) and payload == _payload(tag, i)
            last = i
        other = procs.start(ctx, _produce, writer, ctx.Lock(), 1, 20, True)
        received = [reader.recv(timeout=TIMEOUT) for _ in range(20)]
        assert [(tag, i) for tag, i, _ in received] == [(1, i) for i in range(20)]
        assert all(payload == _payload(tag, i) for tag, i, payload in received)
        other.join(TIMEOUT)
    reader.close()
    writer.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_shared_ends_many_producers_many_consumers(method, procs):
    _run(method, 4, 4, 1000, procs)


@pytest.mark.stress
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_shared_ends_soak(method, procs):
    _run(method, 4, 4, 5000, procs)
