"""``wait()``: block until any of several connections, sockets or sentinels is ready."""

from __future__ import annotations

import selectors
import time
from typing import Any, Iterable, Optional

from ._connection import Connection

_Selector = getattr(selectors, "PollSelector", selectors.SelectSelector)


def wait(object_list: Iterable[Any], timeout: Optional[float] = None) -> list[Any]:
    """Wait till an object in ``object_list`` is ready; return the list of ready ones.

    Same contract as ``multiprocessing.connection.wait``: the objects are hyperpipe or
    standard-library Connections, sockets, ``Process.sentinel`` integers or anything with
    ``fileno()``. ``timeout=None`` waits forever. A hyperpipe Connection counts as ready when
    ``recv`` would not block; it is asked first, so data already in shared memory is seen
    without a system call.
    """
    objects = list(object_list)
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    with _Selector() as selector:
        for obj in objects:
            fd = obj if isinstance(obj, int) else obj.fileno()
            selector.register(fd, selectors.EVENT_READ, obj)
        first = True
        while True:
            ready = [obj for obj in objects if isinstance(obj, Connection) and _ready(obj)]
            if ready:
                # Also report whatever else is ready right now, as the stdlib would.
                others = [key.data for key, _ in selector.select(0)]
                return ready + [o for o in others if not isinstance(o, Connection)]
            if deadline is None:
                remaining = None
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not first:
                    return []
                remaining = max(0.0, remaining)
            first = False
            found = []
            for key, _ in selector.select(remaining):
                obj = key.data
                # A hyperpipe fd may be readable from a stale wake-up; trust poll().
                if not isinstance(obj, Connection) or _ready(obj):
                    found.append(obj)
            if found:
                return found
            if remaining == 0:
                return []


def _ready(conn: Connection[Any, Any]) -> bool:
    try:
        return conn.poll(0)
    except (OSError, EOFError):
        return True
