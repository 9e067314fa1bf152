"""``get_context()`` and ``install()``: hyperpipe under Queue, Pool and ProcessPoolExecutor.

``get_context(method)`` returns a multiprocessing context (a subclass of the standard
library's fork/spawn/forkserver context) whose ``Pipe`` is hyperpipe's and whose queues
(``Queue``, ``SimpleQueue``, ``JoinableQueue``, and so ``Pool`` and
``ProcessPoolExecutor(mp_context=ctx)``) move their items over hyperpipe.

``install()`` makes every ``multiprocessing`` Pipe and queue created afterwards a hyperpipe
one, through whichever context: it replaces ``multiprocessing.connection.Pipe`` (what
``multiprocessing.Pipe()`` and the queues call). ``uninstall()`` puts it back.

Both patch ``multiprocessing.queues`` (see ``_queues``) and wrap
``multiprocessing.connection.wait`` so that a list holding a hyperpipe Connection is waited
on by ``hyperpipe.wait``, which never reports a shared-memory end ready from a stale
wake-up (ProcessPoolExecutor's manager thread would then block in ``recv``). Lists of
standard-library objects only still go to the standard library's ``wait``. docs/pool.md
lists exactly what is patched.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import threading
from typing import Any, Optional

from . import _executor, _pool, _queues
from ._connection import Connection
from ._pipe import Pipe as _hyperpipe_pipe
from ._wait import wait as _hyperpipe_wait

_lock = threading.Lock()
_stdlib_pipe = multiprocessing.connection.Pipe
_stdlib_wait = multiprocessing.connection.wait
_installed = False
_contexts: dict[str, Any] = {}


class HyperpipeContextMixin:
    """What a hyperpipe context changes in a standard-library context: its pipes."""

    def Pipe(self, duplex: bool = True) -> tuple[Connection, Connection]:
        """Two hyperpipe Connections, like ``multiprocessing.Pipe``."""
        return _hyperpipe_pipe(duplex)

    def __repr__(self) -> str:
        return f"<hyperpipe context {self._name!r}>"  # type: ignore[attr-defined]


def _wants_hyperpipe(ctx: Any) -> bool:
    return _installed or isinstance(ctx, HyperpipeContextMixin)


def _wait(object_list: Any, timeout: Optional[float] = None) -> list:
    objects = list(object_list)
    ready = _executor.ready_without_waiting(objects)
    if ready is not None:
        return ready
    if any(isinstance(obj, Connection) for obj in objects):
        return _hyperpipe_wait(objects, timeout)
    return _stdlib_wait(objects, timeout)


_wait.__doc__ = _stdlib_wait.__doc__
_wait.__wrapped__ = _stdlib_wait  # type: ignore[attr-defined]


def _patch() -> None:
    _queues.set_pipe_policy(_wants_hyperpipe)
    _queues.patch()
    _pool.patch()
    _executor.patch(_wants_hyperpipe)
    multiprocessing.connection.wait = _wait


def _default_method() -> str:
    """The start method ``multiprocessing`` would use, without fixing it as the stdlib's
    ``get_start_method()`` does."""
    default = multiprocessing.context._default_context
    actual = default._actual_context or default._default_context  # type: ignore[attr-defined]
    return actual._name


def get_context(method: Optional[str] = None) -> Any:
    """A multiprocessing context whose Pipe, Queue, SimpleQueue, JoinableQueue and Pool use
    hyperpipe; ``method`` is ``"fork"``, ``"spawn"`` or ``"forkserver"`` (``None``: the
    standard library's current default). Pass it wherever a context goes:
    ``ProcessPoolExecutor(mp_context=ctx)``, ``ctx.Pool()``, ``ctx.Queue()``, libraries."""
    name = _default_method() if method is None else method
    with _lock:
        ctx = _contexts.get(name)
        if ctx is None:
            base = multiprocessing.get_context(name)  # ValueError for an unknown method
            cls = type(f"Hyperpipe{type(base).__name__}", (HyperpipeContextMixin, type(base)), {})
            cls.__module__ = "hyperpipe"
            ctx = _contexts[name] = cls()
        _patch()
    return ctx


def install() -> None:
    """Make every multiprocessing Pipe, Queue, SimpleQueue, JoinableQueue, Pool and
    ProcessPoolExecutor created from now on use hyperpipe (idempotent)."""
    global _installed
    with _lock:
        _patch()
        _installed = True
        multiprocessing.connection.Pipe = _hyperpipe_pipe  # type: ignore[assignment]


def uninstall() -> None:
    """Undo ``install()`` for what is created from now on (idempotent). Queues and pipes
    already made keep working as they are."""
    global _installed
    with _lock:
        _installed = False
        if multiprocessing.connection.Pipe is _hyperpipe_pipe:
            multiprocessing.connection.Pipe = _stdlib_pipe


def installed() -> bool:
    """True between ``install()`` and ``uninstall()``."""
    return _installed
