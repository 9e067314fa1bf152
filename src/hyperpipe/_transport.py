"""The transport layer: what moves whole frames between the two ends of a Connection.

A transport knows nothing of argument checking, direction or locking: ``Connection``
does all of that once, in ``_connection.py``, and calls the methods below with a
single thread per direction at a time (one sender, one receiver, possibly concurrent).
``Connection`` also owns the transport's life: it calls ``close()`` once and
``after_fork_in_child()`` once per fork; a transport registers no process hooks itself.

Contract (every implementation, every method):

- ``deadline`` is an absolute ``time.monotonic()`` value, or ``None`` for "no limit"; one
  that has passed (``0.0`` always has) means "do not wait". When it passes, raise
  ``hyperpipe.TimeoutError`` (``poll`` returns False) and keep the stream intact: a frame
  that partly arrived stays buffered for the next call; a frame that was not accepted for
  sending left nothing in the stream.
- Blocking waits must be woken by ``close()`` from another thread of the same process;
  the woken call raises ``ConnectionClosedError``. ``close()`` itself never waits for
  them, and never leaves half a frame in the stream: a frame being written is finished
  (within a bound: 2 s) or was never started.
- Clean end of stream before a frame -> ``PeerClosedError`` (an ``EOFError``); end of
  stream inside a frame -> ``TruncatedMessageError("got end of file during message")``,
  both an ``EOFError`` (the peer is gone) and an ``OSError`` (the stdlib's exception there);
  sending to a peer that is gone -> ``BrokenPipeError``.
- ``recv_frame(maxlength)``: a frame longer than ``maxlength`` raises
  ``MessageTooLongError`` without reading its body (the Connection then stops reading).

Every method has a default here except the frame primitives, ``poll``, ``fileno``,
``close`` and ``reduce``; ``capabilities`` says which defaults a transport replaced by
something better. Which transport ``Pipe()`` uses is decided in ``_select.py``.
"""

from __future__ import annotations

import dataclasses
import select
import time
from multiprocessing.reduction import ForkingPickler
from typing import Any, Optional

from ._pickling import dumps
from . import errors

Deadline = Optional[float]

#: A deadline that has passed: "do not wait".
PASSED: float = 0.0


def poll_ms(deadline: Deadline) -> int:
    """Milliseconds for ``poll()`` until ``deadline``: -1 for none, rounded up, 0 once passed."""
    if deadline is None:
        return -1
    remaining = deadline - time.monotonic()
    return 0 if remaining <= 0 else max(1, int(remaining * 1000 + 0.999))


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a transport does better than the base class's defaults."""

    #: ``send_frames``/``recv_frames`` move several frames per call (fewer wake-ups)
    batch: bool = False
    #: big buffers travel out of band: ``allocate_buffer`` works and ``recv_object(copy=False)``
    #: may return views of shared memory
    out_of_band: bool = False
    #: ``fileno()`` is readable exactly when ``poll(PASSED)`` is true (spurious readiness
    #: allowed): an event loop can wait on it
    readable_fd: bool = True
    #: ``arm_writable()``/``writable_fileno()`` tell an event loop when a send may go
    writable_fd: bool = False


class Transport:
    """Base class; subclasses implement the frame primitives, ``poll``, ``fileno``, ``close``."""

    #: short name shown by ``Connection.transport`` and ``hyperpipe.info()``
    name = "abstract"
    capabilities = Capabilities()

    # -- frames -------------------------------------------------------------------
    def send_frame(self, data: memoryview, deadline: Deadline) -> None:
        """Send one frame: ``data`` is a contiguous 1-D unsigned-byte memoryview, or a small
        ``bytes`` object (Connection passes those as they are)."""
        raise NotImplementedError

    def send_frames(self, frames: list, deadline: Deadline) -> None:
        """Send each frame in order (a frame that times out: it and the rest are not sent)."""
        for frame in frames:
            self.send_frame(frame, deadline)

    def recv_frame(self, maxlength: Optional[int], deadline: Deadline) -> Any:
        """Receive one whole frame and return it as a bytes-like object."""
        raise NotImplementedError

    def recv_frames(self, maxcount: int, deadline: Deadline) -> list:
        """Wait for one frame, then also take those already waiting, up to ``maxcount``.

        An error after the first frame ends the batch and is left for the next call, so the
        frames taken are not lost: a transport using this default raises a
        ``ProtocolError`` or ``MessageTooLongError`` again on its next receive (the socket
        transport keeps it).
        """
        frames = [self.recv_frame(None, deadline)]
        # No poll() first: a receive that may not wait answers the same question, and a
        # socket pays one system call less per frame (issue 11).
        while len(frames) < maxcount:
            try:
                frames.append(self.recv_frame(None, PASSED))
            except (
                errors.TimeoutError,
                EOFError,
                errors.ProtocolError,
                errors.MessageTooLongError,
            ):
                break  # the next call reports the end of the stream or the broken frame
        return frames

    def recv_frame_into(self, buf: memoryview, offset: int, deadline: Deadline) -> int:
        """Receive one frame into ``buf[offset:]`` (``buf`` is a 1-D byte view).

        Returns its size; a frame that does not fit raises ``BufferTooShort(frame)``.
        Transports that can read straight into ``buf`` override this.
        """
        frame = self.recv_frame(None, deadline)
        size = len(frame)
        if offset + size > len(buf):
            raise errors.BufferTooShort(bytes(frame))
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
        ``copy``: see ``Connection.recv`` (transports without shared memory ignore it).
        """
        return ForkingPickler.loads(self.recv_frame(None, deadline))

    def allocate_buffer(self, nbytes: int) -> Any:
        """A writable buffer that ``send_frame``/``send_object`` pass without copying."""
        raise NotImplementedError(f"the {self.name} transport has no shared buffers")

    def fast_path(self, connection: Any, methods: dict) -> Any:
        """Optional: an object whose attributes replace some of the Connection's methods.

        ``connection`` is a weak reference to the Connection, ``methods`` maps the names
        it may replace (``send_bytes``, ``send_bytes_many``, ``recv_bytes``,
        ``recv_bytes_many``) to the Connection's own methods (functions). A replacement
        must do exactly what the Connection's method does: it may handle the common call
        itself (for example with the GIL held throughout, which makes it atomic as the
        Connection's lock would) and hand every other call to ``methods[name](connection(),
        ...)``. Its ``sending``/``receiving`` attributes are set to False once the
        Connection may no longer send or receive. None (the default): no replacement.
        """
        return None

    # -- readiness, for event loops ----------------------------------------------------
    def poll(self, deadline: Deadline) -> bool:
        """True when ``recv_frame`` would not block (a frame, EOF or an error is pending)."""
        raise NotImplementedError

    def fileno(self) -> int:
        """A descriptor that ``select``/``poll`` see readable when ``poll(PASSED)`` is true."""
        raise NotImplementedError

    def catch_incoming(self, max_seconds: float) -> bool:
        """If the peer is visibly about to deliver a message, wait for it without sleeping,
        at most ``max_seconds``: True if a message waits. An event loop calls this before it
        goes to sleep on ``fileno()``; the default knows of nothing coming."""
        return False

    def arm_writable(self) -> bool:
        """After a send timed out: True if it may go now; False once armed, then wait for
        ``writable_fileno()`` (spurious readiness allowed) and try again."""
        return False

    def writable_fileno(self) -> tuple[int, int]:
        """``(fd, event)``: what an event loop waits on for room to write, and which event
        of it (``select.POLLOUT``: writable; ``select.POLLIN``: readable)."""
        return self.fileno(), select.POLLOUT

    def send_backlog(self) -> int:
        """Bytes of frames accepted by ``send_frame`` but not yet handed to the system."""
        return 0

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Release this end's resources; wake threads blocked in it. Called once."""
        raise NotImplementedError

    def after_fork_in_child(self) -> None:
        """Called once per fork in the child (drop state that belongs to the parent's threads)."""

    def reduce(self) -> tuple:
        """``(callable, args)`` rebuilding this transport in another process (pickling)."""
        raise NotImplementedError

    def statistics(self) -> dict:
        """Counters for introspection; transports add their own keys."""
        return {}
