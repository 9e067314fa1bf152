"""What the Queue / Pool / ProcessPoolExecutor suite runs in its children (a module, so that
spawn and forkserver children can import it by name)."""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.queues
import os
import queue
import time
from typing import Any

import hyperpipe
from hyperpipe import _queues

#: "multiprocessing" is the reference; the others put hyperpipe under the same code.
FLAVORS = ["multiprocessing", "hyperpipe-context", "hyperpipe-install"]
START_METHODS = ["fork", "spawn", "forkserver"]
TIMEOUT = 30.0


class Flavor:
    """One way of getting queues and pools (``ctx``), with one start method."""

    def __init__(self, name: str, method: str) -> None:
        self.name = name
        self.method = method
        if name == "hyperpipe-context":
            self.ctx = hyperpipe.get_context(method)
        else:
            self.ctx = multiprocessing.get_context(method)

    @property
    def is_stdlib(self) -> bool:
        return self.name == "multiprocessing"

    def check_queue(self, q: Any) -> None:
        """The queue moves its items over hyperpipe exactly when this flavor says so."""
        assert _queues.is_hyperpipe_queue(q) == (not self.is_stdlib), (self, q._writer)

    def __repr__(self) -> str:
        return f"Flavor({self.name}, {self.method})"


def produce(q: Any, tag: int, count: int, size: int = 0) -> None:
    """Put ``(tag, i, payload)`` for i in range(count); payload is ``size`` bytes."""
    for i in range(count):
        q.put((tag, i, bytes([i % 251]) * size))


def consume(q: Any, results: Any, count: int) -> None:
    """Get ``count`` items and report ``(pid, [(tag, i), ...])`` (payloads checked here)."""
    seen = []
    for _ in range(count):
        tag, i, payload = q.get(timeout=TIMEOUT)
        if payload != bytes([i % 251]) * len(payload):
            raise AssertionError(f"corrupt payload of item {(tag, i)}")
        seen.append((tag, i))
    results.put((os.getpid(), seen))


def consume_until_none(q: Any, results: Any) -> None:
    """Get items until ``None``; report them as ``consume`` does."""
    seen = []
    while True:
        item = q.get(timeout=TIMEOUT)
        if item is None:
            break
        tag, i, payload = item
        if payload != bytes([i % 251]) * len(payload):
            raise AssertionError(f"corrupt payload of item {(tag, i)}")
        seen.append((tag, i))
    results.put((os.getpid(), seen))


def poll_empty(q: Any, stop: Any) -> None:
    """Ask ``empty()`` without a lock while others receive (what the stdlib allows)."""
    while not stop.is_set():
        q.empty()


def join_consumer(q: Any, count: int) -> None:
    """Take ``count`` items of a JoinableQueue, marking each done."""
    for _ in range(count):
        q.get(timeout=TIMEOUT)
        time.sleep(0.001)
        q.task_done()


def echo_simple(inq: Any, outq: Any) -> None:
    """SimpleQueue child: echo items until ``None``."""
    while True:
        item = inq.get()
        if item is None:
            return
        outq.put(item)


def report_native(q: Any, results: Any) -> None:
    """Report whether ``q`` takes the native path in this process (patched methods)."""
    results.put(multiprocessing.queues.Queue.put is _queues._queue_put and _queues._native(q))


def put_then_wait(q: Any, ready: Any) -> None:
    q.put("item")
    ready.set()
    time.sleep(TIMEOUT)


def array_round_trip(arr: Any) -> Any:
    return arr * 2


def inc(x: int) -> int:
    return x + 1


def fail_on(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def rebinds_itself(x: int) -> tuple:
    """Rebind this very name to ``_rebound`` in the process that runs it."""
    global rebinds_itself
    rebinds_itself = _rebound
    return ("first", x)


def _rebound(x: int) -> tuple:
    return ("rebound", x)


def worker_task_path(_: Any) -> tuple:
    """How this process moves its SimpleQueues' items (their modes, sorted) and the
    functions of the last task front it unpickled (``_queues._loads_task``)."""
    modes = sorted(q._hp_mode for q in gc.get_objects() if isinstance(q, multiprocessing.queues.SimpleQueue)
                   and hasattr(q, "_hp_mode"))
    front = _queues._task_front
    return modes, None if front is None else [name for _, name, _ in front.names]


def die(x: int) -> int:
    os._exit(1)


def pid_of(_: Any) -> int:
    time.sleep(0.01)
    return os.getpid()


def unpicklable() -> Any:
    return lambda: None


Empty = queue.Empty
Full = queue.Full


def echo_queue(inq: Any, outq: Any) -> None:
    """Queue child: echo items until ``None``."""
    while True:
        item = inq.get(timeout=TIMEOUT)
        if item is None:
            return
        outq.put(item)


class OwnFeederQueue(multiprocessing.queues.Queue):
    """A subclass with its own ``_feed`` (as loky's): it keeps the stdlib's item path."""

    @staticmethod
    def _feed(*args: Any) -> None:
        multiprocessing.queues.Queue._feed(*args)


_started: Any = None


def remember_queue(q: Any) -> None:
    """Pool initializer: keep ``q`` for ``report_pid_then_sleep``."""
    global _started
    _started = q


def report_pid_then_sleep() -> None:
    _started.put(os.getpid())
    time.sleep(TIMEOUT)


def fill_and_leave(q: Any, count: int, size: int) -> None:
    q.cancel_join_thread()
    for i in range(count):
        q.put(b"x" * size)
