"""What the asyncio tests share: the event loops to run on and the bound on every wait."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

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
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)
