"""hyperpipe's exceptions: one rooted tree that also inherits what the standard library raises.

Every error hyperpipe raises on purpose is a :class:`HyperpipeError`, and each one is also
an instance of the exception ``multiprocessing.connection`` raises in the same situation,
so ``except EOFError`` or ``except multiprocessing.BufferTooShort`` keeps working::

    HyperpipeError(Exception)
    ├── BufferTooShort(…, multiprocessing.BufferTooShort)   recv_bytes_into: buffer too small
    ├── AuthenticationError(…, multiprocessing.AuthenticationError)
    ├── TimeoutError(…, builtins.TimeoutError, multiprocessing.TimeoutError)
    ├── PeerClosedError(…, EOFError)       the peer closed (or died) and all its data was read
    ├── BrokenPipeError(…, builtins.BrokenPipeError)   sending to a peer that is gone
    ├── ConnectionClosedError(…, OSError)  this end is closed ("handle is closed"),
    │                                      also raised in threads blocked when it closes
    ├── DirectionError(…, OSError)         recv on a write-only end or send on a read-only one
    ├── MessageTooLongError(…, OSError)    "bad message length": longer than maxlength
    ├── ProtocolError(…, OSError)          corrupt frame, version mismatch
    └── TruncatedMessageError(PeerClosedError, ProtocolError)   the peer's stream ended inside
                                           a message: an EOFError (as promised) and the
                                           stdlib's OSError("got end of file during message")

Arguments that are simply wrong raise the builtin ``ValueError``/``TypeError`` exactly
as the standard library does.
"""

from __future__ import annotations

import builtins
import errno
import multiprocessing

__all__ = [
    "HyperpipeError",
    "BufferTooShort",
    "AuthenticationError",
    "TimeoutError",
    "PeerClosedError",
    "BrokenPipeError",
    "ConnectionClosedError",
    "DirectionError",
    "MessageTooLongError",
    "ProtocolError",
    "TruncatedMessageError",
]


class HyperpipeError(Exception):
    """Base class of every exception hyperpipe raises on purpose."""


class BufferTooShort(HyperpipeError, multiprocessing.BufferTooShort):
    """``recv_bytes_into`` got a message longer than the buffer.

    As in the standard library the message is consumed and ``args[0]`` holds all of it.
    """


class AuthenticationError(HyperpipeError, multiprocessing.AuthenticationError):
    """The authkey handshake failed (wrong key, no key on one side, bad digest)."""


class TimeoutError(HyperpipeError, builtins.TimeoutError, multiprocessing.TimeoutError):
    """A ``timeout=`` ran out. The connection stays usable: nothing was lost or half-sent."""

    def __init__(self, *args: object) -> None:
        if not args:
            args = (errno.ETIMEDOUT, "timed out")
        super().__init__(*args)


class PeerClosedError(HyperpipeError, EOFError):
    """The other end is closed (or its process died) and every complete message was read."""


class BrokenPipeError(HyperpipeError, builtins.BrokenPipeError):
    """Sending to a peer whose every copy of its end is closed."""

    def __init__(self, *args: object) -> None:
        if not args:
            args = (errno.EPIPE, "Broken pipe")
        super().__init__(*args)


class ConnectionClosedError(HyperpipeError, OSError):
    """This end is closed; also raised in threads that were blocked on it when it closed."""

    def __init__(self, *args: object) -> None:
        if not args:
            args = ("handle is closed",)
        super().__init__(*args)


class DirectionError(HyperpipeError, OSError):
    """``recv`` on a write-only end, or ``send`` on a read-only one."""


class MessageTooLongError(HyperpipeError, OSError):
    """A message is longer than ``maxlength`` (the standard library's "bad message length")."""

    def __init__(self, *args: object) -> None:
        if not args:
            args = ("bad message length",)
        super().__init__(*args)


class ProtocolError(HyperpipeError, OSError):
    """A frame is corrupt (a truncated one is ``TruncatedMessageError``)."""


class TruncatedMessageError(PeerClosedError, ProtocolError):
    """The stream ended inside a message (the sender died or closed mid-frame).

    Every whole message before it was delivered. It is both an ``EOFError`` (hyperpipe's
    promise: peer gone -> EOFError) and an ``OSError`` (what the standard library raises
    here, "got end of file during message"), so either ``except`` clause catches it.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("got end of file during message",)))


def _fix_module() -> None:
    # Tracebacks and reprs should show the public path.
    for name in __all__:
        globals()[name].__module__ = "hyperpipe"


_fix_module()
