"""What the asyncio tests share: the event loops to run on and the bound on every wait."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any, AsyncIterator, Callable, Optional

import pytest

try:
    import uvloop
except ImportError:  # pragma: no cover - depends on the environment
    uvloop = None
else:
    # libuv opens a process-wide pipe with the first loop: open it now, before the fd-leak check.
    uvloop.new_event_loop().close()

#: Bound on every await that waits for something another task, thread or process does.
STEP = 30.0

LOOPS = ["asyncio", "uvloop"]


def loop_factory_for(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop factory called ``name``; skips the test where uvloop is not installed."""
    if name == "uvloop":
        if uvloop is None:
            pytest.skip("uvloop is not installed (it belongs in the `test` extra)")
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop], coro: Any) -> Any:
    """Run ``coro`` to completion on a fresh loop from ``loop_factory``."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(coro)
    loop = loop_factory()  # Python 3.10: what asyncio.Runner does
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            left = asyncio.all_tasks(loop)
            if left:  # gather() of nothing would make a loop of its own
                for task in left:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


if sys.version_info >= (3, 11):
    timeout = asyncio.timeout
    wait_for = asyncio.wait_for
else:

    async def wait_for(aw: Any, delay: Optional[float]) -> Any:
        """``asyncio.wait_for`` raising the builtin TimeoutError, as it does from Python 3.11."""
        try:
            return await asyncio.wait_for(aw, delay)
        except asyncio.TimeoutError:
            raise TimeoutError from None

    @contextlib.asynccontextmanager
    async def timeout(delay: float) -> AsyncIterator[None]:
        """``asyncio.timeout`` for Python 3.10: cancel the task at the deadline, raise TimeoutError."""
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        handle = asyncio.get_running_loop().call_later(delay, expire)
        try:
            yield
        except asyncio.CancelledError:
            if expired:
                raise TimeoutError from None
            raise
        finally:
            handle.cancel()
