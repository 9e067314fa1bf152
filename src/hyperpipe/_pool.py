"""``multiprocessing.Pool`` over hyperpipe queues: two costs of the parent taken away.

A Pool's parent runs three threads under one GIL (task handler, result handler, worker
handler); with tiny tasks it is the bottleneck, so what it spends per task is what limits
the rate. For a Pool whose queues are hyperpipe's (and only for it):

- **Its task handler's put names a task's functions once.** A ``map`` task is
  ``(job, i, mapstar, ((f, chunk),), {})``; pickling the two functions by name (module import
  and attribute checks) is most of what its pickle costs. ``_TaskSender`` starts the pickle
  with opcodes that put the functions in the unpickler's memo (made once from pickle's own
  output, ``_head``) and pickles the task with a reused pickler whose memo already holds
  them, so each becomes a two-byte memo reference. The worker unpickles the same task, by
  the same names, with any unpickler (a hyperpipe worker looks them up once per run of
  tasks and then only checks them: ``_queues._loads_task``). Per task it still makes pickle's check (the name
  still leads to that function). Tasks whose functions are not pickled by name (partials,
  callables with state, nested names), tasks with buffers to send out of band, a closed
  or non-shared-memory pipe go through ``Connection.send`` as before.
- **The worker handler no longer wakes on every result.** The standard library's worker
  handler waits on the result queue's reader too, so each result that lands while the
  result handler sleeps wakes it for a round of ``_maintain_pool`` (two ``waitpid``
  calls): ~1 us per task. What it needs to hear of is all on the other sentinels (a worker
  exits: its sentinel; the cache empties or the pool closes or terminates: the change
  notifier), so a hyperpipe Pool waits on those only.
"""

from __future__ import annotations

import pickletools
import struct
import sys
import threading
from multiprocessing import pool as _stdlib_pool
from typing import Any, Callable, Optional, cast

from . import _executor, _queues
from ._connection import Connection

#: the standard library's pool module (mapstar and starmapstar are not in typeshed)
_mpp: Any = _stdlib_pool

_original: dict[str, Callable[..., Any]] = {}
_patch_lock = threading.Lock()


def _string_op(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return (b"\x8c" + bytes((len(raw),)) if len(raw) < 256 else b"X" + struct.pack("<I", len(raw))) + raw


def _name(fn: Any) -> Optional[tuple[str, str]]:
    """(module, name) of pickle's own by-name reference to ``fn``, or None when its pickle
    is anything else (a partial, a reducer of its own, a nested name, unpicklable)."""
    fn_pickle = _executor._pickled_fn(fn)
    if fn_pickle is None:
        return None
    names: list[str] = []
    for op, arg, _ in pickletools.genops(fn_pickle):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"):
            names.append(str(arg))
        elif op.name not in ("PROTO", "FRAME", "MEMOIZE", "STACK_GLOBAL", "STOP"):
            return None
    if len(names) != 2 or "." in names[1]:
        return None
    return names[0], names[1]


def _head(fns: tuple) -> Optional[tuple[tuple, tuple, bytes, dict]]:
    """(``fns``, their (module, name) pairs, the prefix and the pickler's memo that name
    them once), or None when one of them is not pickled by name."""
    names = [_name(fn) for fn in fns]
    if None in names:
        return None
    prefix = b"\x80\x05" + b"".join(_string_op(m) + _string_op(n) + _queues.MEMOIZE_POP for m, n in cast(list, names))
    return fns, tuple(names), prefix, {id(fn): (index, fn) for index, fn in enumerate(fns)}


class _TaskSender:
    """A Pool task handler's ``put`` for its hyperpipe task queue (see the module's doc)."""

    __slots__ = ("_conn", "_items", "_lock", "_head")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        # pickles with ForkingPickler's reducers and notices buffers to send out of band
        self._items = _queues._ItemSender(conn, _queues.NATIVE_SHM)
        self._lock = conn._send_lock
        self._head: Optional[tuple[tuple, tuple, bytes, dict]] = None  # the last tasks' (``_head``)

    def put(self, task: Any) -> None:
        data = self._pickle(task)
        transport: Any = self._conn._transport
        if data is None or transport is None or not self._conn._writable:
            self._conn.send(task)
            return
        lock = self._lock
        lock.acquire()
        try:
            if len(data) <= transport._inline:
                transport._send(data, None)
            else:
                transport.send_frame(data, None)
        finally:
            lock.release()

    def _pickle(self, task: Any) -> Optional[bytes]:
        """``task``'s pickle with its functions named once at the front, or None when it
        takes ``Connection.send``."""
        if type(task) is not tuple or len(task) != 5:
            return None
        func, args = task[2], task[3]
        # a map's args: ((f, chunk),)
        if (func is _mpp.mapstar or func is _mpp.starmapstar) and type(args) is tuple and len(args) == 1 \
                and type(args[0]) is tuple and len(args[0]) == 2:
            fns: tuple = (func, args[0][0])
        else:
            fns = (func,)
        head = self._head
        # by identity (``==`` could run a callable's own __eq__); one or two functions
        if head is None or len(head[0]) != len(fns) or head[0][0] is not func or head[0][-1] is not fns[-1]:
            head = self._head = _head(fns)
            if head is None:
                return None
        # pickle's own check, per task: the name still leads to that very function (else
        # Connection.send pickles the task, and fails as the standard library's does);
        # a map's mapstar/starmapstar was just compared with the module's attribute
        module, name = head[1][-1]
        if getattr(sys.modules.get(module), name, None) is not fns[-1]:
            self._head = None
            return None
        prefix, memo = head[2], head[3]
        data = self._items.dump(task, memo)
        # after the prefix, the task's own pickle minus its PROTO: a task function is a
        # BINGET of the memo the prefix filled, so the worker unpickles the same task
        return None if data is None else prefix + data[2:]


def _setup_queues(self: Any) -> None:
    _original["Pool._setup_queues"](self)
    inqueue = self._inqueue
    if _queues.is_hyperpipe_queue(inqueue) and _queues._simple_mode(inqueue) == _queues.NATIVE_SHM:
        self._quick_put = _TaskSender(inqueue._writer).put


def _get_sentinels(self: Any) -> list:
    if _queues.is_hyperpipe_queue(self._outqueue):
        return [self._change_notifier._reader]
    return _original["Pool._get_sentinels"](self)


_PATCHES: dict[tuple[type, str], Callable[..., Any]] = {(_mpp.Pool, "_setup_queues"): _setup_queues, (_mpp.Pool, "_get_sentinels"): _get_sentinels}


def patch() -> None:
    """Patch ``multiprocessing.pool.Pool`` (idempotent); only Pools over hyperpipe queues change."""
    with _patch_lock:
        if not _original:
            _queues.patch_methods(_PATCHES, _original)
