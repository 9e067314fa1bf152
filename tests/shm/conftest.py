"""Fixtures for the shared-memory transport's own tests (transport level, no Connection)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Iterator

import pytest

from hyperpipe import _shm_transport

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shm_helpers import dev_shm_entries, fd_count, memfd_fds, memfd_mappings  # noqa: E402

if not _shm_transport.available():
    pytest.skip("the shared-memory transport is not available here", allow_module_level=True)



@pytest.fixture
def resources() -> Iterator[Any]:
    """Counts of fds, hyperpipe memfds and mappings; the test asserts they come back."""

    # multiprocessing's resource sharer (used by DupFd outside of spawning) keeps a
    # listening socket for the life of the process: start it before counting.
    from multiprocessing import resource_sharer

    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(resource_sharer.DupFd(fd).detach())
    os.close(fd)

    class Snapshot:
        def __init__(self) -> None:
            import gc

            gc.collect()
            self.fds = fd_count()
            self.memfds = memfd_fds()
            self.maps = memfd_mappings()
            self.shm = dev_shm_entries()

        def assert_released(self) -> None:
            import gc

            gc.collect()
            assert fd_count() == self.fds
            assert memfd_fds() == self.memfds
            assert memfd_mappings() == self.maps
            assert dev_shm_entries() <= self.shm

    yield Snapshot()


@pytest.fixture
def pair() -> Iterator[tuple[Any, Any]]:
    a, b = _shm_transport.shm_pipe(True)
    yield a, b
    a.close()
    b.close()


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """SIGALRM fails a test that hangs (the main thread's blocking calls are interrupted)."""

    def alarm(signum: int, frame: Any) -> None:
        raise TimeoutError("watchdog: test took too long (hang?)")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(90)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
