"""Helpers shared by the shared-memory tests (importable from spawned children too)."""

from __future__ import annotations

import os
from typing import Any


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:hyperpipe"):
                n += 1
        except OSError:
            pass
    return n


def memfd_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "memfd:hyperpipe" in line)


def dev_shm_entries() -> set[str]:
    """The /dev/shm names this process answers for: hyperpipe's own (it should make none, its
    memory is memfds) and those this process holds open or mapped. Other programs on the
    machine add and remove names there at any time: they are not ours to count."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return set()
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    with open("/proc/self/maps") as f:
        held.update(line.split(None, 5)[-1].strip() for line in f)
    return {n for n in names if n.startswith("hyperpipe") or f"/dev/shm/{n}" in held}


def join_or_kill(proc: Any, timeout: float = 60.0) -> Any:
    """Join (kill after `timeout`), release the process object, return its exit code."""
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
        raise AssertionError(f"child {proc.pid} did not finish within {timeout} s")
    code = proc.exitcode
    proc.close()  # its sentinel pipes
    return code
