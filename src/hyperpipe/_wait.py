"""``wait()`` and ``WaitSet``: block until any of several connections, sockets or sentinels is ready."""

from __future__ import annotations

import os
import select
import selectors
import socket
import threading
import time
from typing import Any, Iterable, Iterator, Optional

from ._connection import Connection
from ._transport import poll_ms

_POLLIN = select.POLLIN | select.POLLPRI


def wait(object_list: Iterable[Any], timeout: Optional[float] = None) -> list[Any]:
    """Wait till an object in ``object_list`` is ready; return the list of ready ones.

    Same contract as ``multiprocessing.connection.wait``: the objects are hyperpipe or
    standard-library Connections, sockets, ``Process.sentinel`` integers or anything with
    ``fileno()``. ``timeout=None`` waits forever. A hyperpipe Connection counts as ready when
    ``recv`` would not block. For many objects and many waits, ``WaitSet`` registers them
    once.
    """
    objects = list(object_list)
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    # One poll() over plain descriptors, as the stdlib's PollSelector does, without its
    # per-object bookkeeping.
    poller = select.poll()
    by_fd: dict[int, list[Any]] = {}
    for obj in objects:
        fd = obj if isinstance(obj, int) else obj.fileno()
        if fd in by_fd:
            by_fd[fd].append(obj)
        else:
            by_fd[fd] = [obj]
            poller.register(fd, _POLLIN)
    while True:
        ms = poll_ms(deadline)
        found = [obj for fd, _ in poller.poll(ms) for obj in by_fd[fd] if _ready(obj)]
        if found or ms == 0:
            return found


def _ready(obj: Any, timeout: float = 0.0) -> bool:
    """Whether a reported object is ready: a hyperpipe fd may be readable from a stale
    wake-up, so a hyperpipe Connection is asked (``poll(timeout)``, which also drains it).
    A Connection that fails to answer counts as ready: its ``recv`` raises the error."""
    if not isinstance(obj, Connection):
        return True
    try:
        return obj.poll(timeout)
    except (OSError, EOFError):
        return True


class WaitSet:
    """A set of connections, sockets and sentinels to wait on many times.

    ``wait()`` (the standard library's and hyperpipe's) registers every object again on each
    call: O(n) work per call, however few are ready. A WaitSet registers each object once,
    in an epoll (or the platform's best) selector, so that a wait costs O(ready)::

        with hyperpipe.WaitSet(worker_conns) as waitset:
            while waitset:
                for conn in waitset.wait(timeout=1.0):
                    try:
                        handle(conn.recv())
                    except EOFError:
                        waitset.remove(conn)
                        conn.close()

    ``wait(timeout)`` has the contract of ``wait()``: it returns the objects that are ready
    (a Connection when ``recv`` would not block, including at EOF), or ``[]`` at the
    timeout; ``None`` waits forever. ``close()`` from another thread ends a blocked ``wait``
    (it returns ``[]``). A member closed while in the set is dropped from it and never
    reported: remove objects when you are done with them. Adding, removing and waiting are
    meant for one thread at a time.
    """

    def __init__(self, objects: Iterable[Any] = ()) -> None:
        self._lock = threading.Lock()
        self._selector: Optional[selectors.BaseSelector] = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()  # close() from another thread writes here
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._members: dict[int, tuple[Any, int]] = {}  # id(obj) -> (obj, its fd)
        self._waiting = self._closing = False
        try:
            for obj in objects:
                self.add(obj)
        except BaseException:
            self.close()
            raise

    def _open_selector(self) -> selectors.BaseSelector:
        if self._selector is None or self._closing:
            raise ValueError("the WaitSet is closed")
        return self._selector

    def add(self, obj: Any) -> None:
        """Watch ``obj`` (a Connection, socket, ``Process.sentinel`` or anything with ``fileno()``)."""
        selector = self._open_selector()
        if id(obj) in self._members:
            return
        fd = obj if isinstance(obj, int) else obj.fileno()
        try:
            selector.register(fd, selectors.EVENT_READ, obj)
        except KeyError:
            # The descriptor is registered already: a member closed (and its number
            # reused) gives way; two live objects sharing a descriptor do not.
            other = selector.get_key(fd).data
            if other is _WAKE or not _is_closed(other):
                raise ValueError(f"{obj!r} shares its descriptor with {other!r}, already in the set") from None
            self.discard(other)
            selector.register(fd, selectors.EVENT_READ, obj)
        self._members[id(obj)] = (obj, fd)

    def remove(self, obj: Any) -> None:
        """Stop watching ``obj``; KeyError if it is not in the set."""
        if id(obj) not in self._members:
            raise KeyError(obj)
        self.discard(obj)

    def discard(self, obj: Any) -> None:
        """Stop watching ``obj`` if it is in the set (also after it was closed)."""
        member = self._members.pop(id(obj), None)
        if member is None or self._selector is None:
            return
        try:
            key = self._selector.get_key(member[1])
        except KeyError:
            return
        if key.data is obj:
            self._selector.unregister(member[1])

    def wait(self, timeout: Optional[float] = None) -> list[Any]:
        """The members that are ready, waiting up to ``timeout`` seconds (None: no limit)."""
        with self._lock:
            selector = self._open_selector()
            self._waiting = True
        try:
            deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = []
                for key, _ in selector.select(remaining):
                    obj = key.data
                    if obj is _WAKE:
                        return []  # closed from another thread
                    if _is_closed(obj):
                        self.discard(obj)
                    elif _ready(obj):
                        ready.append(obj)
                if ready or remaining == 0:
                    return ready
        finally:
            with self._lock:
                self._waiting = False
                if self._closing:
                    self._release()

    def close(self) -> None:
        """Forget every member (they stay open) and release the selector.

        From another thread while ``wait`` is blocked: wakes it (it returns ``[]``), and
        the waiting thread releases the selector on its way out.
        """
        with self._lock:
            if self._selector is None or self._closing:
                return
            self._closing = True
            if self._waiting:
                try:
                    os.write(self._wake_w, b"x")
                except BlockingIOError:
                    pass  # a byte is already there
                return
            self._release()

    def _release(self) -> None:
        assert self._selector is not None
        self._selector.close()
        self._selector = None
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._members.clear()

    def __enter__(self) -> "WaitSet":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_selector", None) is not None and not self._waiting:
            self._release()

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, obj: Any) -> bool:
        return id(obj) in self._members

    def __iter__(self) -> Iterator[Any]:
        return iter([obj for obj, _ in self._members.values()])

    def __repr__(self) -> str:
        state = "closed" if self._selector is None or self._closing else f"{len(self._members)} members"
        return f"<hyperpipe.WaitSet {state}>"


_WAKE = object()  # the WaitSet's own wake-up pipe in its selector


def _is_closed(obj: Any) -> bool:
    closed = getattr(obj, "closed", False)  # Connections (both kinds)
    if closed is True:
        return True
    fileno = getattr(obj, "fileno", None)
    if isinstance(obj, socket.socket) and fileno is not None:
        return fileno() < 0
    return False
