"""How the shared-memory core behaves toward the machine: page faults, CPUs, spinning.

These assert behaviour through counters (page faults, the endpoint's statistics) and
whether a call spun or slept, never through speed: how fast it is, the benchmark measures.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import sys
import threading
import time
from typing import Any, Optional

import pytest
from shm_helpers import join_or_kill

import hyperpipe
from hyperpipe import _shm_transport

RING = 1 << 20
MSG = b"\x5a" * 64
# 64-byte messages take 72 bytes of ring each: two passes through a 1 MiB ring.
ROUND_TRIPS = 2 * RING // 72


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _ping(conn: Any, n: int) -> int:
    """`n` round trips as the initiator; the page faults they took in this process."""
    conn.send_bytes(MSG)  # the first call maps the rings: not counted
    conn.recv_bytes()
    before = _minor_faults()
    for _ in range(n):
        conn.send_bytes(MSG)
        conn.recv_bytes()
    return _minor_faults() - before


def _echo_and_count(conn: Any, n: int, out: Any) -> None:
    conn.recv_bytes()
    conn.send_bytes(MSG)
    before = _minor_faults()
    for _ in range(n):
        conn.send_bytes(conn.recv_bytes())
    out.send(_minor_faults() - before)


@pytest.mark.skipif(
    "asan" in os.environ.get("LD_PRELOAD", ""),
    reason="under AddressSanitizer (./dev asan) every allocation faults in fresh shadow memory",
)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_ring_pass_takes_no_page_fault_per_page(start_method: str) -> None:
    # Without mapping the rings in one go, each side faults once per 4 KiB of each ring
    # on its first pass (2 rings x 256 pages here), and a forked child always does:
    # fork copies no page tables of a shared mapping.
    ctx = multiprocessing.get_context(start_method)
    a, b = hyperpipe.Pipe(ring_size=RING)
    report_r, report_w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_echo_and_count, args=(b, ROUND_TRIPS, report_w))
    child.start()
    b.close()
    report_w.close()
    try:
        parent_faults = _ping(a, ROUND_TRIPS)
        assert report_r.poll(60), "the child did not report"
        child_faults = report_r.recv()
    finally:
        a.close()
        report_r.close()
        assert join_or_kill(child) == 0
    pages = 2 * RING // 4096
    # Python allocates a little on its own; a fault per ring page would be >= 512.
    assert parent_faults < pages // 8, parent_faults
    assert child_faults < pages // 8, child_faults


def _echo_pinned(conn: Any, cpu: int, n: int, out: Any) -> None:
    os.sched_setaffinity(0, {cpu})
    for _ in range(n):
        conn.send_bytes(conn.recv_bytes())
    out.send(conn.statistics()["shared_cpu_yields"])


def _pinned_round_trips(parent_cpu: int, child_cpu: int, n: int = 3000) -> tuple[int, int]:
    ctx = multiprocessing.get_context("fork")
    a, b = hyperpipe.Pipe()
    report_r, report_w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_echo_pinned, args=(b, child_cpu, n, report_w))
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {parent_cpu})
    try:
        child.start()
        b.close()
        report_w.close()
        for i in range(n):
            a.send_bytes(i.to_bytes(4, "little"))
            assert a.recv_bytes() == i.to_bytes(4, "little")
        assert report_r.poll(60), "the child did not report"
        return a.statistics()["shared_cpu_yields"], report_r.recv()
    finally:
        os.sched_setaffinity(0, saved)
        a.close()
        report_r.close()
        assert join_or_kill(child) == 0


def test_a_waiter_on_its_peers_cpu_hands_the_cpu_over() -> None:
    # Both ends on one CPU: each wait finds the peer there and yields to it at once
    # (spinning would only delay the peer until the time slice ends).
    cpu = min(os.sched_getaffinity(0))
    parent_yields, child_yields = _pinned_round_trips(cpu, cpu)
    assert parent_yields > 0 and child_yields > 0, (parent_yields, child_yields)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_waiters_on_different_cpus_never_yield_for_the_peer() -> None:
    first, second = sorted(os.sched_getaffinity(0))[:2]
    assert _pinned_round_trips(first, second) == (0, 0)


# -- a receiver waiting for a big message that is being copied --------------------------

BIG = 4 << 20  # the biggest announced copy: the receiver may spin up to ~2.2 ms for it


def _receive_in_thread(
    end: Any, timeout: float, go: Optional[threading.Event] = None
) -> tuple[threading.Thread, dict]:
    """A thread receiving one frame from ``end`` (once ``go`` is set, if given: starting a
    thread can take milliseconds on a loaded machine, longer than an announcement lasts)."""
    got: dict = {}

    def run() -> None:
        if go is not None:
            go.wait(10)
        before, cpu = end.statistics()["sleeps"], time.thread_time()
        try:
            got["frame"] = end.recv_frame(None, time.monotonic() + timeout)
        except Exception as exc:
            got["error"] = exc
        got["sleeps"] = end.statistics()["sleeps"] - before
        got["cpu_s"] = time.thread_time() - cpu

    thread = threading.Thread(target=run)
    thread.start()
    return thread, got


def _heap_block_publisher(ep: Any, offset: int) -> Any:
    """What sends the BIG bytes copied into our heap block at ``offset`` (as send_bytes
    does), made before the timed part begins."""
    head, size = _shm_transport._oob_head(BIG, offset, [(0, BIG)], 0)
    return lambda: ep.send_parts(_shm_transport.KIND_OOB, 0, head, None, (), size, None)


def test_a_receiver_spins_through_an_announced_copy(pair: Any) -> None:
    # The sender reserves heap space (which announces the copy), then takes over 0.3 ms,
    # 6 times the spin window, before it publishes: the receiver keeps spinning instead of
    # going to sleep mid-copy and paying a wake-up on top of the copy. (Three attempts:
    # on a loaded machine this thread can lose its CPU for longer than the ~2 ms the
    # announcement lasts; without the announcement every attempt sleeps.)
    a, b = pair
    ep = a._ep
    payload = memoryview(b"\x01" * BIG)
    a.send_frame(payload, None)  # once, so that the heap's pages exist in both processes
    b.recv_frame(None, None).release()
    for _ in range(3):
        go = threading.Event()
        thread, got = _receive_in_thread(b, timeout=10, go=go)
        offset = ep.heap_alloc(BIG)
        assert offset >= 0
        publish = _heap_block_publisher(ep, offset)
        go.set()
        time.sleep(0.0003)
        ep.heap_write(offset, payload)
        publish()
        thread.join(10)
        assert not thread.is_alive()
        assert "error" not in got, got.get("error")
        frame = got["frame"]
        assert len(frame) == BIG and frame[0] == 1 and frame[-1] == 1
        frame.release()
        if got["sleeps"] == 0:
            break
    assert got["sleeps"] == 0


def test_an_abandoned_copy_stops_holding_the_receiver(pair: Any) -> None:
    # A send that reserved heap space and then failed frees it, and with it the
    # announcement: the receiver goes back to its 50 µs spin and sleeps, instead of
    # spinning for the ~2 ms the copy of 4 MiB was announced to take.
    a, b = pair
    ep = a._ep
    offset = ep.heap_alloc(BIG)
    ep.heap_release(offset)
    thread, got = _receive_in_thread(b, timeout=0.2)
    thread.join(10)
    assert isinstance(got.get("error"), hyperpipe.TimeoutError)
    assert got["sleeps"] >= 1
    assert got["cpu_s"] < 0.003, got["cpu_s"]


def test_an_announced_copy_wakes_a_sleeping_receiver_at_once(pair: Any) -> None:
    # A receiver asleep when the copy starts is woken then, not when the frame lands, so
    # that its wake-up overlaps the copy; it then spins for the frame, so the publish
    # itself needs no second wake-up.
    a, b = pair
    ep = a._ep
    payload = memoryview(b"\x02" * BIG)
    a.send_frame(payload, None)  # the heap's pages exist in both processes
    b.recv_frame(None, None).release()
    thread, got = _receive_in_thread(b, timeout=10)
    time.sleep(0.05)  # far past its spin window: asleep
    wakes = a.statistics()["wakeups_sent"]
    offset = ep.heap_alloc(BIG)
    publish = _heap_block_publisher(ep, offset)
    assert a.statistics()["wakeups_sent"] == wakes + 1  # woken by the announcement
    time.sleep(0.0003)
    ep.heap_write(offset, payload)
    publish()
    thread.join(10)
    assert not thread.is_alive() and "error" not in got
    assert len(got["frame"]) == BIG and got["frame"][-1] == 2
    got["frame"].release()
    assert got["sleeps"] == 1  # slept once, then stayed awake for the frame
    assert a.statistics()["wakeups_sent"] == wakes + 1


def test_catch_incoming_waits_only_for_an_announced_copy(pair: Any) -> None:
    a, b = pair
    ep = a._ep
    cpu = time.thread_time()
    assert b.catch_incoming(0.05) is False  # nothing announced: returns at once
    assert time.thread_time() - cpu < 0.02
    payload = memoryview(b"\x03" * BIG)
    a.send_frame(payload, None)  # the heap's pages exist in both processes
    b.recv_frame(None, None).release()
    for _ in range(3):  # attempts, as in test_a_receiver_spins_through_an_announced_copy
        go = threading.Event()
        offset = -1

        def publish_soon() -> None:
            go.wait(10)
            time.sleep(0.0003)
            ep.heap_write(offset, payload)
            _heap_block_publisher(ep, offset)()

        sender = threading.Thread(target=publish_soon)
        sender.start()  # before the announcement: starting a thread can take milliseconds
        offset = ep.heap_alloc(BIG)  # announced as ~2 ms away
        go.set()
        try:
            caught = b.catch_incoming(0.5)  # spins until the announced frame lands
        finally:
            sender.join(10)
        frame = b.recv_frame(None, 1.0)
        assert len(frame) == BIG and frame[0] == 3
        frame.release()
        if caught:
            break
    assert caught



def test_a_copy_from_memory_is_not_announced(pair: Any) -> None:
    # Above 4 MiB the copy runs from memory for hundreds of microseconds, and a receiver
    # spinning on the other CPU meanwhile slows it: it is not woken early, nor held awake.
    a, b = pair
    ep = a._ep
    thread, got = _receive_in_thread(b, timeout=0.2)
    time.sleep(0.05)  # far past its spin window: asleep
    wakes = a.statistics()["wakeups_sent"]
    offset = ep.heap_alloc(BIG + 1)
    try:
        assert a.statistics()["wakeups_sent"] == wakes
        cpu = time.thread_time()
        assert b.catch_incoming(0.05) is False  # nothing announced: returns at once
        assert time.thread_time() - cpu < 0.02
    finally:
        ep.heap_release(offset)
    thread.join(10)
    assert isinstance(got.get("error"), hyperpipe.TimeoutError)


def test_the_end_of_a_copy_from_memory_is_announced(pair: Any) -> None:
    # Above 4 MiB only the copy's last MiB is announced. A thread that asks catch_incoming
    # then spins for the frame with the GIL released instead of returning at once. Seen
    # through the GIL: the sending thread needs it back to publish, and this thread's loop
    # (switch interval 2 s) lets go of it only while spinning; without the announcement
    # the frame waits for the switch interval. (Three attempts: on a loaded machine the
    # sender can lose its CPU for longer than the time announced for the last MiB.)
    a, b = pair
    payload = memoryview(b"\x04" * (32 << 20))  # a few milliseconds to copy
    a.send_frame(payload, None)  # once, so that the heap's pages exist in both processes
    b.recv_frame(None, None).release()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(2.0)
    try:
        for _ in range(3):
            sender = threading.Thread(target=a.send_frame, args=(payload, None))
            sender.start()
            time.sleep(0.001)  # the GIL back only once the sender copies (GIL released)
            start = time.monotonic()
            while not b.catch_incoming(0.5):
                pass
            took = time.monotonic() - start
            sender.join(10)
            assert not sender.is_alive()
            frame = b.recv_frame(None, 1.0)
            assert len(frame) == len(payload) and frame[0] == 4 and frame[-1] == 4
            frame.release()
            if took < 1.0:
                break
    finally:
        sys.setswitchinterval(interval)
    assert took < 1.0, took  # ~3-10 ms for the copy; 2 s without the announcement
