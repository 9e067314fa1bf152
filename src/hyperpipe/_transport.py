"""The transport layer: what moves whole frames between the two ends of a Connection.

A transport knows nothing of argument checking, direction or locking: ``Connection``
does all of that once, in ``_connection.py``, and calls the methods below with a
single thread per direction at a time (one sender, one receiver, possibly concurrent).

Contract (every implementation, every method):

- ``deadline`` is an absolute ``time.monotonic()`` value, or ``None`` for "no limit".
  When it passes, raise ``hyperpipe.TimeoutError`` and keep the stream intact:
  a frame that partly arrived stays buffered for the next call; a frame that was not
  accepted for sending left nothing in the stream.
- Blocking waits must be woken by ``close()`` from another thread of the same process;
  the woken call raises ``ConnectionClosedError``.
- Clean end of stream before a frame -> ``PeerClosedError`` (an ``EOFError``); end of
  stream inside a frame -> ``ProtocolError("got end of file during message")``;
  sending to a peer that is gone -> ``BrokenPipeError``.
- ``recv_frame(maxlength)``: a frame longer than ``maxlength`` raises
  ``MessageTooLongError`` without reading its body (the Connection then stops reading).

Transports are selected in one place, ``select_transport`` below.
"""

from __future__ import annotations

import os
import time
from multiprocessing.reduction import ForkingPickler
from typing import Any, Optional

from ._pickling import dumps
from .errors import BufferTooShort

Deadline = Optional[float]


def poll_ms(deadline: Deadline) -> int:
    """Milliseconds for ``poll()`` until ``deadline``: -1 for none, rounded up, 0 once passed."""
    if deadline is None:
        return -1
    remaining = deadline - time.monotonic()
    return 0 if remaining <= 0 else max(1, int(remaining * 1000 + 0.999))


class Transport:
    """Base class; subclasses implement the frame methods, ``poll``, ``fileno``, ``close``."""

    #: short name shown by ``Connection.transport`` and ``hyperpipe.info()``
    name = "abstract"

    # -- frames -------------------------------------------------------------------
    def send_frame(self, data: memoryview, deadline: Deadline) -> None:
        """Send one frame: ``data`` is a contiguous 1-D unsigned-byte memoryview, or a small
        ``bytes`` object (Connection passes those as they are)."""
        raise NotImplementedError

    def recv_frame(self, maxlength: Optional[int], deadline: Deadline) -> Any:
        """Receive one whole frame and return it as a bytes-like object."""
        raise NotImplementedError

    def recv_frame_into(self, buf: memoryview, offset: int, deadline: Deadline) -> int:
        """Receive one frame into ``buf[offset:]`` (``buf`` is a 1-D byte view).

        Returns its size; a frame that does not fit raises ``BufferTooShort(frame)``.
        Transports that can read straight into ``buf`` override this.
        """
        frame = self.recv_frame(None, deadline)
        size = len(frame)
        if offset + size > len(buf):
            raise BufferTooShort(bytes(frame))
        buf[offset : offset + size] = frame
        return size

    # -- objects ------------------------------------------------------------------
    def send_object(self, obj: Any, deadline: Deadline) -> None:
        """Pickle ``obj`` completely (in-band, like the stdlib), then send it as one frame.

        Pickling first means an unpicklable object raises here with nothing sent.
        """
        data = dumps(obj)
        self.send_frame(memoryview(data).cast("B"), deadline)

    def recv_object(self, deadline: Deadline, copy: bool = True) -> Any:
        """Receive one whole frame, then unpickle it.

        A frame that fails to unpickle has been consumed, so the next one is intact.
        ``copy=False`` is a hint transports with shared buffers may use.
        """
        return ForkingPickler.loads(self.recv_frame(None, deadline))

    # -- readiness and lifetime -----------------------------------------------------
    def poll(self, timeout: Optional[float]) -> bool:
        """True when ``recv_frame`` would not block (a frame, EOF or an error is pending)."""
        raise NotImplementedError

    def fileno(self) -> int:
        """A descriptor that ``select``/``poll`` see readable when ``poll(0)`` is true."""
        raise NotImplementedError

    def close(self) -> None:
        """Release this end's resources; wake threads blocked in it. Idempotent."""
        raise NotImplementedError

    def after_fork_in_child(self) -> None:
        """Called in a forked child for every live transport (drop thread-local state)."""

    def reduce(self) -> tuple:
        """``(callable, args)`` rebuilding this transport in another process (pickling)."""
        raise NotImplementedError

    def statistics(self) -> dict:
        """Counters for introspection; transports add their own keys."""
        return {}


# -- selection ---------------------------------------------------------------------

#: ``HYPERPIPE_TRANSPORT=socket`` forces the socket transport for ``Pipe()``.
TRANSPORT_ENV = "HYPERPIPE_TRANSPORT"


def available_transports() -> list[str]:
    """Names of the transports ``Pipe()`` can use on this machine, best first."""
    names = []
    try:
        from . import _shm_transport

        if _shm_transport.available():
            names.append("shm")
    except ImportError:
        pass
    names.append("socket")
    return names


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
