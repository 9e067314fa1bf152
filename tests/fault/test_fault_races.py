"""Thread races on one connection: send, recv, poll and close from several threads at once.

- Several senders and receivers on one pair: every message arrives whole, once, and each
  sender's messages in its order.
- ``poll`` while another thread waits in ``recv_bytes`` answers True or False, as the
  standard library's does, and the waiting receiver still gets its message.
- ``close()`` from another thread wakes a thread blocked in ``recv_bytes``, ``poll(None)``
  or a ``send_bytes`` that waits for room, with ``ConnectionClosedError``.
- ``close()`` of the sending end while a big message is being written: the receiver gets
  the whole message then ``EOFError``, or ``EOFError`` alone, never half a frame.
- A random mix of all of them, then a close at a random moment: every thread ends within
  the bound with a documented exception, and every message it got is whole.

Every thread is joined with a timeout: a thread still running is a hang and fails the round.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable

import pytest
from fault_helpers import COUNTS, SEED, STEP_TIMEOUT, TRANSPORTS, KiB, MiB, check_message, checked_message, rng_for

import hyperpipe

_STOP = b"stop"
#: What a thread racing a close may get besides its result.
RACE_ERRORS = (EOFError, OSError)  # OSError covers ConnectionClosedError, BrokenPipeError, TimeoutError


class Threads:
    """Threads whose unexpected exceptions are kept; ``join()`` fails on a thread still running."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []

    def start(self, target: Callable[..., Any], *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            except Exception as exc:
                self.errors.append(f"{target.__name__}: {exc!r}")

        thread = threading.Thread(target=run, name=target.__name__, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def join(self, timeout: float = STEP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self.threads if t.is_alive()]
        assert not stuck, f"seed {SEED}: threads hung: {stuck}"
        assert not self.errors, f"seed {SEED}: " + "; ".join(self.errors)


def _check_any(data: bytes) -> tuple[int, int]:
    """Check a message whose sequence number says who sent it; returns (sender, number)."""
    seq = int.from_bytes(data[:8], "little")
    check_message(data, seq, len(data))
    return divmod(seq, 1_000_000)


# -- many senders, many receivers, a poller ---------------------------------------------


def _concurrent_traffic(transport: str, rounds: int, per_sender: int) -> None:
    sizes = [64, 4 * KiB, 200 * KiB, 2 * MiB]
    for number in range(rounds):
        rng = rng_for("traffic", transport, number)
        a, b = hyperpipe.Pipe(transport=transport)
        got: list[list[tuple[int, int]]] = [[], []]
        threads = Threads()

        def sender(who: int) -> None:
            plan = [rng.choice(sizes) for _ in range(per_sender)]
            for n, size in enumerate(plan):
                a.send_bytes(checked_message(who * 1_000_000 + n, size), timeout=STEP_TIMEOUT)

        def receiver(slot: int) -> None:
            while True:
                data = b.recv_bytes(timeout=STEP_TIMEOUT)
                if data == _STOP:
                    return
                got[slot].append(_check_any(data))

        with a, b:
            senders = [threads.start(sender, who) for who in range(3)]
            threads.start(receiver, 0)
            threads.start(receiver, 1)
            for thread in senders:
                thread.join(STEP_TIMEOUT)
            for _ in got:
                a.send_bytes(_STOP)
            threads.join()
        everything = sorted(got[0] + got[1])
        assert everything == [(who, n) for who in range(3) for n in range(per_sender)], "lost or doubled"
        for seen in got:  # each receiver saw each sender's messages in order
            for who in range(3):
                mine = [n for w, n in seen if w == who]
                assert mine == sorted(mine), f"sender {who}'s messages out of order"
        COUNTS["thread-race rounds"] += 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_concurrent_traffic_fast(transport: str) -> None:
    _concurrent_traffic(transport, rounds=1, per_sender=30)


@pytest.mark.stress
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_concurrent_traffic_full(transport: str) -> None:
    _concurrent_traffic(transport, rounds=50, per_sender=200)


def _poll_beside_a_receiver(transport: str, rounds: int) -> None:
    for number in range(rounds):
        a, b = hyperpipe.Pipe(transport=transport)
        threads = Threads()
        received = []
        with a, b:
            threads.start(lambda: received.append(b.recv_bytes(timeout=STEP_TIMEOUT)))
            time.sleep(0.01)  # let it wait inside recv_bytes
            answers = [b.poll(timeout) for timeout in (0, 0.001, 0.01) * 3]
            a.send_bytes(checked_message(number, 4 * KiB))
            threads.join()
        # the stdlib returns False (no data) or True, and never raises, whoever else is reading
        assert all(isinstance(answer, bool) for answer in answers), answers
        check_message(received[0], number, 4 * KiB)
        COUNTS["thread-race rounds"] += 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_poll_beside_a_receiver_fast(transport: str) -> None:
    _poll_beside_a_receiver(transport, rounds=2)


@pytest.mark.stress
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_poll_beside_a_receiver_full(transport: str) -> None:
    _poll_beside_a_receiver(transport, rounds=100)


# -- close from another thread wakes blocked calls --------------------------------------


def _blocked_recv(conn: Any, peer: Any) -> None:
    conn.recv_bytes()


def _blocked_poll(conn: Any, peer: Any) -> None:
    conn.poll(None)


def _blocked_send(conn: Any, peer: Any) -> None:
    chunk = bytes(4 * MiB)
    while True:  # until the buffers are full and a send waits for room
        conn.send_bytes(chunk)


BLOCKED_CALLS = {"recv_bytes": _blocked_recv, "poll(None)": _blocked_poll, "send_bytes": _blocked_send}


def _close_wakes(transport: str, call: str, rounds: int) -> None:
    rng = rng_for("close-wakes", transport, call)
    for _ in range(rounds):
        a, b = hyperpipe.Pipe(transport=transport)
        outcome: list[BaseException] = []

        def blocked() -> None:
            try:
                BLOCKED_CALLS[call](a, b)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=blocked, daemon=True)
        thread.start()
        time.sleep(rng.uniform(0.01, 0.1))  # let it block
        closed_at = time.monotonic()
        a.close()
        thread.join(STEP_TIMEOUT)
        woke = time.monotonic() - closed_at
        b.close()
        assert not thread.is_alive(), f"seed {SEED}: close() did not wake a thread in {call}"
        assert len(outcome) == 1 and isinstance(outcome[0], hyperpipe.ConnectionClosedError), outcome
        assert woke < 5.0, f"close() took {woke:.2f} s to wake {call}"
        COUNTS["close-wakes-a-blocked-call rounds"] += 1


@pytest.mark.parametrize("call", sorted(BLOCKED_CALLS))
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_close_wakes_blocked_call_fast(transport: str, call: str) -> None:
    _close_wakes(transport, call, rounds=1)


@pytest.mark.stress
@pytest.mark.parametrize("call", sorted(BLOCKED_CALLS))
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_close_wakes_blocked_call_full(transport: str, call: str) -> None:
    _close_wakes(transport, call, rounds=100)


# -- close during a big send -------------------------------------------------------------

BIG = 16 * MiB


def _close_during_send(transport: str, rounds: int) -> None:
    rng = rng_for("close-during-send", transport)
    half_frames = []
    for number in range(rounds):
        a, b = hyperpipe.Pipe(transport=transport)
        received: list[Any] = []
        threads = Threads()

        def send() -> None:
            try:
                a.send_bytes(checked_message(number, BIG))
            except hyperpipe.ConnectionClosedError:
                pass  # closed before it started: nothing sent, which the receiver must see

        def receive() -> None:
            try:
                while True:
                    received.append(b.recv_bytes(timeout=STEP_TIMEOUT))
            except EOFError as exc:
                received.append(exc)
            except OSError as exc:
                half_frames.append(f"round {number}: {exc!r}")

        with b:
            threads.start(send)
            threads.start(receive)
            time.sleep(rng.uniform(0, 0.02))
            a.close()
            threads.join()
        if half_frames and half_frames[-1].startswith(f"round {number}:"):
            continue  # counted; the test fails with all of them at the end
        assert received, "the receiver ended without EOFError"
        *messages, end = received
        assert isinstance(end, EOFError), end
        for data in messages:
            check_message(data, number, BIG)
        assert len(messages) <= 1
        COUNTS["close-during-send rounds"] += 1
    COUNTS["close-during-send half frames"] += len(half_frames)
    assert not half_frames, f"seed {SEED}: {len(half_frames)} of {rounds} rounds: " + "; ".join(half_frames[:5])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_close_during_big_send_fast(transport: str) -> None:
    _close_during_send(transport, rounds=5)


@pytest.mark.stress
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_close_during_big_send_full(transport: str) -> None:
    _close_during_send(transport, rounds=200)


# -- everything at once ------------------------------------------------------------------


def _random_mix(transport: str, rounds: int) -> None:
    sizes = [16, 1 * KiB, 100 * KiB, 1 * MiB]
    for number in range(rounds):
        rng = rng_for("mix", transport, number)
        a, b = hyperpipe.Pipe(transport=transport)
        threads = Threads()

        def worker(conn: Any, who: int, actions: int) -> None:
            own = rng_for("mix", transport, number, who)
            for n in range(actions):
                action = own.choice(["send", "send", "recv", "poll"])
                try:
                    if action == "send":
                        conn.send_bytes(checked_message(who * 1_000_000 + n, own.choice(sizes)), timeout=0.05)
                    elif action == "recv":
                        _check_any(conn.recv_bytes(timeout=0.05))
                    else:
                        conn.poll(own.uniform(0, 0.01))
                except hyperpipe.TimeoutError:
                    continue  # nothing to read or no room right now; the connection stays usable
                except RACE_ERRORS:
                    if a.closed or b.closed:
                        return  # the close this round is about
                    raise

        for who in range(6):
            threads.start(worker, a if who % 2 else b, who, rng.randrange(20, 200))
        time.sleep(rng.uniform(0, 0.05))
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        first.close()
        time.sleep(rng.uniform(0, 0.01))
        second.close()
        threads.join()
        COUNTS["random-mix rounds"] += 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_random_mix_fast(transport: str) -> None:
    _random_mix(transport, rounds=5)


@pytest.mark.stress
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_random_mix_full(transport: str) -> None:
    _random_mix(transport, rounds=300)
