"""What the fault matrix shares: the seed, checkable messages, the survivor's resources, figures.

Child targets live here at module level (the matrix forks its children, but a module-level
target also survives a switch to ``spawn``). Every wait has a bound: a bug fails a round,
it never hangs the run.
"""

from __future__ import annotations

import collections
import errno
import gc
import os
import random
import statistics
import struct
from typing import Any, Optional

#: ``HYPERPIPE_FAULT_SEED=<int>`` replays (or varies) a run; the seed is printed in the header.
SEED = int(os.environ.get("HYPERPIPE_FAULT_SEED", "20261130"))

TRANSPORTS = ["shm", "socket"]

KiB = 1 << 10
MiB = 1 << 20

#: Longest any single step (a receive, a send, a join) may take before it counts as a hang.
STEP_TIMEOUT = 20.0

_SEQ = struct.Struct("<Q")
#: Shift of message ``seq``'s body in the pattern: two messages never carry the same bytes.
_SHIFT_SPAN = 4096
_pattern_cache: dict[int, bytes] = {}


def rng_for(*labels: Any) -> random.Random:
    """A generator for one test or round: the run's seed plus where it is used."""
    return random.Random(f"{SEED}:" + ":".join(map(str, labels)))


def _pattern(length: int) -> bytes:
    """Seeded random bytes (made once per length per process, inherited by forked children)."""
    block = _pattern_cache.get(length)
    if block is None:
        block = random.Random(SEED).randbytes(length)
        _pattern_cache[length] = block
    return block


def checked_message(seq: int, size: int) -> bytes:
    """``size`` bytes: ``seq``, a body that depends on ``seq``, ``seq`` again (``size`` >= 16)."""
    shift = (seq * 61) % _SHIFT_SPAN
    tag = _SEQ.pack(seq)
    body = memoryview(_pattern(size + _SHIFT_SPAN))[shift : shift + size - 2 * _SEQ.size]
    return b"".join((tag, body, tag))


def check_message(data: Any, seq: int, size: int) -> None:
    """Fail unless ``data`` is exactly message ``seq`` of ``size`` bytes (whole, in order)."""
    view = memoryview(data)
    assert view.nbytes == size, f"message {seq}: {view.nbytes} bytes instead of {size}"
    head = _SEQ.unpack(view[: _SEQ.size])[0]
    tail = _SEQ.unpack(view[-_SEQ.size :])[0]
    assert (head, tail) == (seq, seq), f"expected message {seq}, got head {head} / tail {tail}"
    shift = (seq * 61) % _SHIFT_SPAN
    expected = memoryview(_pattern(size + _SHIFT_SPAN))[shift : shift + size - 2 * _SEQ.size]
    assert view[_SEQ.size : -_SEQ.size] == expected, f"message {seq}: body corrupted"


def send_checked(conn: Any, seq: int, message: bytes, timeout: Optional[float] = None) -> None:
    """Even messages go as bytes, odd ones as a pickled ``(seq, bytearray)``: both wire paths
    (on the shm transport a big bytearray is an out-of-band buffer of the pickle)."""
    if seq % 2 == 0:
        conn.send_bytes(message, timeout=timeout)
    else:
        conn.send((seq, bytearray(message)), timeout=timeout)


def recv_checked(conn: Any, seq: int, size: int, timeout: float) -> None:
    """Receive message ``seq`` the way ``send_checked`` sent it, and check it."""
    if seq % 2 == 0:
        check_message(conn.recv_bytes(timeout=timeout), seq, size)
    else:
        got, body = conn.recv(timeout=timeout)
        assert got == seq, f"expected object message {seq}, got {got}"
        check_message(body, seq, size)


# -- child targets ---------------------------------------------------------------------


def stream_until_killed(conn: Any, size: int) -> None:
    """Send checked messages 0, 1, 2... until the test kills this process."""
    seq = 0
    while True:
        send_checked(conn, seq, checked_message(seq, size))
        seq += 1


def drain_until_killed(conn: Any) -> None:
    """Receive (and drop) messages until the test kills this process."""
    conn.send_bytes(b"ready")
    seq = 0
    while True:
        if seq % 2 == 0:
            conn.recv_bytes()
        else:
            conn.recv()
        seq += 1


def exhaust_descriptors() -> list[int]:
    """Open ``/dev/null`` until the process has no descriptor left; return what was opened."""
    opened = []
    while True:
        try:
            opened.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            assert exc.errno == errno.EMFILE, exc
            return opened


# -- what the survivor holds -----------------------------------------------------------


def _link(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # the descriptor of the listdir itself
        return ""


def fd_table() -> dict[int, str]:
    return {int(fd): target for fd in os.listdir("/proc/self/fd") if (target := _link(fd))}


def _hyperpipe_mappings() -> list[str]:
    """Shared-memory mappings hyperpipe made (memfds and /dev/shm files, not its library),
    and shared anonymous ones ("/dev/zero (deleted)": the socket transport's buffers for
    big frames; nothing else in these tests makes them)."""
    with open("/proc/self/maps") as maps:
        fields = [line.split(None, 5) for line in maps]
    paths = [f[5].strip() for f in fields if len(f) == 6]
    return [
        p
        for p in paths
        if "hyperpipe" in p and (p.startswith("/memfd:") or p.startswith("/dev/shm/")) or p.startswith("/dev/zero")
    ]


class Resources:
    """This process' descriptors and hyperpipe mappings; ``leaked()`` lists what is new."""

    def __init__(self) -> None:
        gc.collect()
        self.fds = fd_table()
        self.mappings = collections.Counter(_hyperpipe_mappings())

    def leaked(self) -> list[str]:
        gc.collect()
        new_fds = [f"fd {fd} -> {target}" for fd, target in fd_table().items() if self.fds.get(fd) != target]
        new_maps = collections.Counter(_hyperpipe_mappings()) - self.mappings
        return new_fds + [f"mapping {name} x{n}" for name, n in new_maps.items()]


# -- the figures of a run --------------------------------------------------------------

#: Printed at the end of the session (conftest): what each part of the matrix did and found.
FIGURES: dict[str, Any] = collections.defaultdict(lambda: collections.defaultdict(list))
COUNTS: collections.Counter = collections.Counter()


def record_kill(transport: str, victim: str, size: int, seconds: Optional[float]) -> None:
    """One kill: the time from it to the survivor's error, or None if the round went wrong."""
    FIGURES["kill-to-error latency"][(transport, victim, size)].append(seconds)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def latency_table() -> list[str]:
    rows = FIGURES.get("kill-to-error latency", {})
    if not rows:
        return []
    lines = [
        "| transport | killed | size | kills | wrong | p50 ms | p99 ms | max ms |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (transport, victim, size), outcomes in sorted(rows.items()):
        values = [v for v in outcomes if v is not None]
        figures = [statistics.median(values), percentile(values, 0.99), max(values)] if values else []
        shown = " | ".join(f"{v * 1e3:.1f}" for v in figures) if values else "- | - | -"
        lines.append(
            f"| {transport} | {victim} | {human_size(size)} | {len(outcomes)} | {outcomes.count(None)} | {shown} |"
        )
    return lines


def human_size(size: int) -> str:
    for unit, scale in (("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def bounded_join(proc: Any, timeout: float = STEP_TIMEOUT) -> Optional[int]:
    """Join a child (killing it if it outlives ``timeout``) and release its descriptors."""
    proc.join(timeout)
    pid, alive = proc.pid, proc.is_alive()
    if alive:
        proc.kill()
        proc.join(5)
    code = proc.exitcode
    proc.close()
    assert not alive, f"child {pid} still running after {timeout} s"
    return code
