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
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


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
