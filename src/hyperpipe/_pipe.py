"""``Pipe()``: two connected Connections over the best transport available here."""

from __future__ import annotations

from typing import Any, Optional

from ._connection import Connection
from ._core_status import warn_on_fallback
from ._select import select_transport
from ._transport import Transport


def Pipe(
    duplex: bool = True, *, transport: Optional[str] = None, **options: Any
) -> tuple[Connection[Any, Any], Connection[Any, Any]]:
    """Return a pair ``(conn1, conn2)`` of connected Connections, like ``multiprocessing.Pipe``.

    With ``duplex=False`` ``conn1`` can only receive and ``conn2`` only send.

    Keyword-only extras: ``transport`` picks ``"shm"`` (shared memory, the default where
    the C core is available), ``"socket"`` (a socketpair / ``os.pipe``, the standard
    library's own mechanism) or ``"auto"``; the environment variable
    ``HYPERPIPE_TRANSPORT`` sets the default. Other keywords tune the shared-memory
    transport (see ``hyperpipe._shm_transport.shm_pipe``); the socket transport takes
    ``spin_us`` (how long a waiting receive spins before it blocks, default 50; 0: never).
    """
    name = select_transport(transport)
    warn_on_fallback(transport)
    end1: Transport
    end2: Transport
    if name == "shm":
        from ._shm_transport import shm_pipe

        end1, end2 = shm_pipe(bool(duplex), **options)
    else:
        spin = options.pop("spin_us", None)
        if options:
            raise TypeError(
                f"Pipe() got unexpected keyword arguments for the socket transport: {sorted(options)}"
            )
        from ._socket_transport import SPIN_US, socket_pipe

        end1, end2 = socket_pipe(bool(duplex), spin_us=SPIN_US if spin is None else spin)
    if duplex:
        return Connection(end1), Connection(end2)
    return Connection(end1, writable=False), Connection(end2, readable=False)
