"""ProcessPoolExecutor under hyperpipe: a wake-up that costs nothing while the manager is busy.

The standard library's executor wakes its manager thread through a ``_ThreadWakeup``: every
``submit()`` sends an empty message on a ``multiprocessing.Pipe`` (a ``write`` system call
under the executor's shutdown lock), and after every wait the manager drains it with
``poll()`` + ``recv_bytes()`` until ``poll()`` says no (a selector and 2-3 more system calls).
With 20,000 tiny tasks that was over a quarter of the manager thread's samples and a
third of ``submit()``'s (py-spy).

For an executor built with a hyperpipe context (or after ``install()``),
``ProcessPoolExecutor.__init__`` swaps that object for an ``ExecutorWakeup``, a subclass with
the same contract whose wake-ups coalesce: the descriptor is written only when no wake-up is
pending, and cleared only when one is, so while the manager has not yet cleared the last
one a ``submit()`` costs no system call. The manager re-reads everything a wake-up stands
for (new work ids, the shutdown flags) after ``clear()``, so a wake-up that finds one
pending is never lost.

The manager's ``wait([result_reader, wakeup_reader, *sentinels])`` (the patched
``multiprocessing.connection.wait``) also answers without a system call when a result is
already in the ring or a wake-up is pending (``ready_without_waiting``): the manager takes
the result first whatever else is ready, so the others need not be asked. Otherwise it
watches the result ring for ``RESULT_WATCH`` (50 us) before it sleeps on every descriptor.

Each task travels to a worker as a ``_CallItem`` holding ``partial(_process_chunk, fn)``
(``map``) or ``fn`` (``submit``): pickling it looks up 3-4 globals, 4-5 us of the
manager's ~40 us per task. When ``fn`` is made of module-level functions only (pickled by
name, so its pickle never changes), the executor's call queue sends it as
``_rebuild_call_item(work_id, <fn pickled once>, args, kwargs)`` instead (``_CompactCallItem``,
still a ``_CallItem`` for the queue's error handling); the worker gets the same
``_CallItem``, its function looked up by name as before.

The classes stay the standard library's, so subclasses of ``ProcessPoolExecutor`` keep
working; an executor whose wake-up is not exactly the standard library's ``_ThreadWakeup``
is left alone.
"""

from __future__ import annotations

import copyreg
import functools
import os
import pickle
import sys
import threading
import types
from concurrent.futures import process as _cfp
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Optional, cast

from . import _queues
from ._connection import Connection
from ._pickling import dumps
from ._wait import _ready

_original_init: Optional[Callable[..., None]] = None
_patch_lock = threading.Lock()

#: decides, from the executor's ``mp_context``, whether it gets an ``ExecutorWakeup``
_wants_hyperpipe: Callable[[Any], bool] = lambda ctx: False  # noqa: E731


class _WakeupPipe:
    """The descriptor pair behind an ``ExecutorWakeup`` and its ``pending`` flag; the manager
    thread waits on ``fileno()``. Both ends are non-blocking: a signal or a drain never
    waits."""

    __slots__ = ("_read_fd", "_write_fd", "pending", "__weakref__")

    def __init__(self) -> None:
        self.pending = False
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    def fileno(self) -> int:
        if self._read_fd < 0:
            raise OSError("handle is closed")
        return self._read_fd

    def signal(self) -> None:
        try:
            os.write(self._write_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so readable already

    def drain(self) -> None:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self._read_fd >= 0:
            os.close(self._read_fd)
            os.close(self._write_fd)
            self._read_fd = self._write_fd = -1

    def __del__(self) -> None:
        self.close()


class ExecutorWakeup(_cfp._ThreadWakeup):
    """``_ThreadWakeup`` with coalescing wake-ups (see the module's docstring).

    Invariant, outside ``_lock``: ``pending`` <=> the pipe holds a byte. ``wakeup()`` sets
    both under the lock; ``clear()`` empties both under it, so a wake-up never lands
    between the drain and the reset (which would leave the flag set with nothing to wake
    the manager). The standard library calls ``wakeup()`` from any thread and ``clear()``
    and ``close()`` from the manager thread only (``close()`` also under the shutdown lock).
    """

    def __init__(self) -> None:  # no super().__init__(): it would make the pipe we replace
        self._closed = False
        self._lock = threading.Lock()
        self._reader: Any = _WakeupPipe()  # typeshed says Connection: the stdlib only waits on it

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._reader.close()

    def wakeup(self) -> None:
        pipe = self._reader
        if pipe.pending:
            return  # the manager has not cleared the last one: it will see this change too
        with self._lock:
            if not self._closed and not pipe.pending:
                pipe.signal()
                pipe.pending = True

    def clear(self) -> None:
        pipe = self._reader
        if not pipe.pending:
            return
        with self._lock:
            if not self._closed:
                pipe.drain()
                pipe.pending = False


#: how long the manager's wait watches the result ring alone (spinning, GIL released, as a
#: hyperpipe receive does) before it sleeps on every descriptor: the next result is
#: usually microseconds away, and a sleep costs a wake-up on each side (20,000 tiny tasks:
#: ~15,000 of 40,000 waits slept without it, ~50 with it; the parent's CPU per task went
#: from 35-40 us to 28-30, same runs). A wake-up or a dead worker is seen this much later.
RESULT_WATCH = 50e-6


def ready_without_waiting(objects: list) -> Optional[list]:
    """The executor manager's ``wait([result_reader, wakeup_reader, *sentinels])`` answered
    without a system call when a result waits in a hyperpipe ring or a wake-up is pending,
    or after watching the ring for ``RESULT_WATCH``; ``None`` for any other list, or when
    a real wait is needed.

    The manager (3.10-3.13) receives the result whenever ``result_reader`` is among the
    ready objects, whatever else is; a wake-up or a dead worker is seen on a later loop.
    """
    if len(objects) < 2 or type(objects[1]) is not _WakeupPipe:
        return None
    result_reader, wakeup_pipe = objects[0], objects[1]
    if not isinstance(result_reader, Connection):
        return None
    if _ready(result_reader):
        return [result_reader, wakeup_pipe] if wakeup_pipe.pending else [result_reader]
    if wakeup_pipe.pending:
        return [wakeup_pipe]
    if _ready(result_reader, RESULT_WATCH):
        return [result_reader, wakeup_pipe] if wakeup_pipe.pending else [result_reader]
    return None


# -- call items: the task's function pickled once -----------------------------------------

#: how many distinct functions keep their pickle (those of the last few ``map`` calls)
FN_CACHE_SIZE = 8

#: id(fn) -> (fn, its pickle); holding fn keeps its id from being reused
_pickled_fns: dict[int, tuple[Any, bytes]] = {}
_pickled_fns_lock = threading.Lock()

_BY_NAME = (types.FunctionType, types.BuiltinFunctionType)


def _pickled_by_name(obj: Any) -> bool:
    """Whether ``obj``'s pickle is fixed once made: module-level functions (pickled by
    name, unless a reducer was registered for them) and partials of them. A builtin
    bound to an object (``some_list.append``) pickles that object: not fixed."""
    kind = type(obj)
    if kind in _BY_NAME:
        bound_to = getattr(obj, "__self__", None)
        if bound_to is not None and not isinstance(bound_to, types.ModuleType):
            return False
        return kind not in getattr(ForkingPickler, "_extra_reducers") and kind not in copyreg.dispatch_table
    if kind is functools.partial:
        return (
            not obj.keywords
            and not obj.__dict__
            and _pickled_by_name(obj.func)
            and all(_pickled_by_name(arg) for arg in obj.args)
        )
    return False


def _still_named(obj: Any) -> bool:
    """Whether the names ``obj``'s pickle holds still lead to the same objects, as pickle
    checks each time it pickles a function by name ("not the same object" otherwise)."""
    if type(obj) is functools.partial:
        return _still_named(obj.func) and all(map(_still_named, obj.args))
    found = sys.modules.get(getattr(obj, "__module__", None) or "")
    for part in obj.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is obj


def _pickled_fn(fn: Any) -> Optional[bytes]:
    """``fn``'s pickle, made once, or None when it must be pickled with each task."""
    entry = _pickled_fns.get(id(fn))
    if entry is not None and entry[0] is fn:
        if _still_named(fn):
            return entry[1]
        with _pickled_fns_lock:  # rebound since: pickled with the task, which then fails as the stdlib's does
            _pickled_fns.pop(id(fn), None)
        return None
    if not _pickled_by_name(fn):
        return None
    try:
        data = dumps(fn, 5)
    except Exception:
        return None  # pickled with the task, which then fails as the stdlib's does
    with _pickled_fns_lock:
        while len(_pickled_fns) >= FN_CACHE_SIZE:
            del _pickled_fns[next(iter(_pickled_fns))]
        _pickled_fns[id(fn)] = (fn, data)
    return data


def _rebuild_call_item(work_id: int, fn_pickle: bytes, args: tuple, kwargs: dict) -> Any:
    return _cfp._CallItem(work_id, pickle.loads(fn_pickle), args, kwargs)


class _CompactCallItem(_cfp._CallItem):
    """A ``_CallItem`` whose function travels as the pickle made once (``fn_pickle``)."""

    fn_pickle: bytes

    def __reduce__(self) -> tuple:
        return _rebuild_call_item, (self.work_id, self.fn_pickle, self.args, self.kwargs)


def _put_call_item(queue: Any, obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
    """The executor's call queue's ``put``: a ``_CallItem`` goes compact when it can."""
    if type(obj) is _cfp._CallItem:
        fn_pickle = _pickled_fn(obj.fn)
        if fn_pickle is not None:
            obj.__class__ = _CompactCallItem  # the manager made it for this put alone
            cast(Any, obj).fn_pickle = fn_pickle
    type(queue).put(queue, obj, block, timeout)


def _executor_init(self: Any, *args: Any, **kwargs: Any) -> None:
    assert _original_init is not None
    _original_init(self, *args, **kwargs)
    stdlib_wakeup: Any = getattr(self, "_executor_manager_thread_wakeup", None)
    call_queue: Any = getattr(self, "_call_queue", None)
    if (
        type(stdlib_wakeup) is _cfp._ThreadWakeup
        and getattr(call_queue, "thread_wakeup", None) is stdlib_wakeup
        and _wants_hyperpipe(self._mp_context)
    ):
        self._executor_manager_thread_wakeup = call_queue.thread_wakeup = ExecutorWakeup()
        cast(Any, stdlib_wakeup).close()
        if _queues.is_hyperpipe_queue(call_queue):
            call_queue.put = types.MethodType(_put_call_item, call_queue)


def patch(wants_hyperpipe: Callable[[Any], bool]) -> None:
    """Patch ``ProcessPoolExecutor.__init__`` (idempotent); ``wants_hyperpipe(mp_context)``
    says which executors get an ``ExecutorWakeup``."""
    global _original_init, _wants_hyperpipe
    with _patch_lock:
        _wants_hyperpipe = wants_hyperpipe
        if _original_init is not None:
            return
        cls = _cfp.ProcessPoolExecutor
        _original_init = cls.__dict__["__init__"]
        _executor_init.__name__ = "__init__"
        _executor_init.__qualname__ = "ProcessPoolExecutor.__init__"
        _executor_init.__doc__ = _original_init.__doc__
        _executor_init.__wrapped__ = _original_init  # type: ignore[attr-defined]
        cls.__init__ = _executor_init  # type: ignore[method-assign]
