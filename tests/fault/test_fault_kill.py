"""SIGKILL of either side at a random moment: the survivor gets whole messages, then the error.

A round: a forked child streams checked messages to the test process (or drains what the
test sends), a timer thread SIGKILLs it at a random moment, and the survivor must

- get every message whole and in order (sequence number at both ends, a body that depends
  on it; every other message goes as a pickled object rather than bytes) and then
  ``EOFError``; a sender gets ``BrokenPipeError``;
- never wait longer than ``STEP_TIMEOUT`` for any call (a hang fails the round);
- hold no new descriptor or hyperpipe mapping once it has closed its end.

The time from the kill to the error is the latency figure of docs/reliability.md.
A cell runs all its rounds and then fails with every anomaly it saw, so a full run
reports how often something goes wrong, not only that it does.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import pytest
from fault_helpers import (
    COUNTS,
    SEED,
    STEP_TIMEOUT,
    TRANSPORTS,
    KiB,
    MiB,
    Resources,
    bounded_join,
    checked_message,
    drain_until_killed,
    human_size,
    record_kill,
    recv_checked,
    rng_for,
    send_checked,
    stream_until_killed,
)

import hyperpipe

FAST_SIZES = [64, 4 * KiB, 1 * MiB]
FULL_SIZES = [64, 4 * KiB, 1 * MiB, 64 * MiB]
VICTIMS = ["sender", "receiver"]
#: 16 cells x 63 = 1,008 kills in the full run.
FULL_ROUNDS = 63
#: How long after the child is known to be running the kill may land: long enough to
#: catch several messages in flight (a 64 MiB one takes tens of milliseconds to cross).
KILL_WINDOW = {64: 0.02, 4 * KiB: 0.02, 1 * MiB: 0.05, 64 * MiB: 0.4}

_fork = multiprocessing.get_context("fork")


def _cells(sizes: list[int], *marks: Any) -> list[Any]:
    return [
        pytest.param(
            transport,
            victim,
            size,
            marks=list(marks),
            id=f"{transport}-{victim}-{human_size(size).replace(' ', '')}",
        )
        for transport in TRANSPORTS
        for victim in VICTIMS
        for size in sizes
    ]


class _Killer:
    """SIGKILLs a child after a delay from a timer thread, noting when."""

    def __init__(self, pid: int, delay: float) -> None:
        self.killed_at = 0.0
        self._pid = pid
        self._timer = threading.Timer(delay, self._kill)
        self._timer.start()

    def _kill(self) -> None:
        self.killed_at = time.monotonic()
        os.kill(self._pid, signal.SIGKILL)

    def stop(self) -> float:
        """When the kill happened (0.0 if it did not: a round that failed first cancels it)."""
        self._timer.cancel()
        self._timer.join(STEP_TIMEOUT)
        return self.killed_at


def _kill_the_sender(survivor: Any, proc: Any, size: int, delay: float) -> tuple[float, int]:
    """Receive until EOF while the streaming child is killed; returns (latency, messages)."""
    recv_checked(survivor, 0, size, STEP_TIMEOUT)  # it is streaming
    killer = _Killer(proc.pid, delay)
    seq = 1
    try:
        while True:
            recv_checked(survivor, seq, size, STEP_TIMEOUT)
            seq += 1
    except EOFError:
        ended = time.monotonic()
    finally:
        killed_at = killer.stop()
    assert killed_at, "EOFError before the child was killed"
    with pytest.raises(EOFError):
        survivor.recv_bytes(timeout=STEP_TIMEOUT)  # and it stays at EOF
    return ended - killed_at, seq


def _kill_the_receiver(survivor: Any, proc: Any, size: int, delay: float) -> tuple[float, int]:
    """Send until BrokenPipeError while the draining child is killed."""
    assert survivor.recv_bytes(timeout=STEP_TIMEOUT) == b"ready"
    message = checked_message(0, size)
    killer = _Killer(proc.pid, delay)
    sent = 0
    try:
        while True:
            send_checked(survivor, sent, message, STEP_TIMEOUT)
            sent += 1
    except BrokenPipeError:
        ended = time.monotonic()
    finally:
        killed_at = killer.stop()
    assert killed_at, "BrokenPipeError before the child was killed"
    return ended - killed_at, sent


def _round(transport: str, victim: str, size: int, delay: float) -> tuple[float, int]:
    survivor, doomed = hyperpipe.Pipe(transport=transport)
    if victim == "sender":
        proc = _fork.Process(target=stream_until_killed, args=(doomed, size), daemon=True)
    else:
        proc = _fork.Process(target=drain_until_killed, args=(doomed,), daemon=True)
    try:
        proc.start()
        doomed.close()  # the child's copy is the only one left: its death is the peer's death
        if victim == "sender":
            return _kill_the_sender(survivor, proc, size, delay)
        return _kill_the_receiver(survivor, proc, size, delay)
    finally:
        survivor.close()
        doomed.close()
        if proc.pid is not None:
            proc.kill()  # already dead unless the round failed early
            bounded_join(proc)


def _kind(exc: Exception) -> str:
    if isinstance(exc, hyperpipe.TimeoutError):
        return "hang"
    if isinstance(exc, AssertionError):
        return "corrupt, missing or early message"
    return f"{type(exc).__qualname__} instead of EOFError/BrokenPipeError"


def _run_cell(transport: str, victim: str, size: int, rounds: int) -> None:
    rng = rng_for("kill", transport, victim, size)
    anomalies: list[str] = []
    latencies = []
    messages = 0
    for number in range(rounds):
        before = Resources()
        try:
            latency, count = _round(transport, victim, size, rng.uniform(0, KILL_WINDOW[size]))
        except Exception as exc:  # an anomaly of this round; the cell goes on
            anomalies.append(f"round {number}: {type(exc).__module__}.{type(exc).__qualname__}: {exc}")
            COUNTS[f"SIGKILL anomalies: {_kind(exc)}"] += 1
            record_kill(transport, victim, size, None)
            continue
        messages += count
        leaked = before.leaked()
        if leaked:
            anomalies.append(f"round {number}: the survivor leaked {leaked}")
            COUNTS["SIGKILL anomalies: leak"] += 1
            record_kill(transport, victim, size, None)
        else:
            latencies.append(latency)
            record_kill(transport, victim, size, latency)
    COUNTS["SIGKILLs"] += rounds
    COUNTS["messages checked around kills"] += messages
    worst = f", worst {max(latencies) * 1e3:.1f} ms to the error" if latencies else ""
    print(f"seed {SEED}: {rounds} kills, {messages} messages{worst}, {len(anomalies)} anomalies")
    assert not anomalies, f"seed {SEED}: {len(anomalies)} of {rounds} rounds went wrong:\n" + "\n".join(
        anomalies[:20]
    )


@pytest.mark.parametrize("transport, victim, size", _cells(FAST_SIZES))
def test_sigkill_fast(transport: str, victim: str, size: int) -> None:
    _run_cell(transport, victim, size, rounds=1)


@pytest.mark.parametrize("transport, victim, size", _cells(FULL_SIZES, pytest.mark.stress))
def test_sigkill_matrix(transport: str, victim: str, size: int) -> None:
    _run_cell(transport, victim, size, rounds=FULL_ROUNDS)
