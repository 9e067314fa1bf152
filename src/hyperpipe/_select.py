"""Which transport ``Pipe()`` uses: the one place that knows every transport."""

from __future__ import annotations

import os
from typing import Optional

#: ``HYPERPIPE_TRANSPORT=socket`` forces the socket transport for ``Pipe()``.
TRANSPORT_ENV = "HYPERPIPE_TRANSPORT"


def available_transports() -> list[str]:
    """Names of the transports ``Pipe()`` can use on this machine, best first."""
    from . import _shm_transport

    return ["shm", "socket"] if _shm_transport.available() else ["socket"]


def select_transport(requested: Optional[str] = None) -> str:
    """The transport ``Pipe()`` uses: ``requested``, else ``$HYPERPIPE_TRANSPORT``, else the best."""
    name = requested or os.environ.get(TRANSPORT_ENV) or None
    names = available_transports()
    if name is None or name == "auto":
        return names[0]
    if name not in ("shm", "socket"):
        raise ValueError(f"unknown transport {name!r} (expected 'shm', 'socket' or 'auto')")
    if name not in names:
        raise ValueError(f"transport {name!r} is not available here (available: {names})")
    return name
