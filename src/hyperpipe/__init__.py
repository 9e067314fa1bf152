"""hyperpipe: a drop-in, much faster ``multiprocessing.Pipe``.

``from hyperpipe import Pipe`` is all existing code changes. The public surface mirrors
``multiprocessing.connection`` (``Pipe``, ``Connection``, ``Listener``, ``Client``,
``wait`` and its exceptions); everything beyond it is keyword-only.

Layout (see docs/design.md): ``_connection`` (the Connection every transport sits
under), ``_socket_transport`` (socketpair / os.pipe / TCP, the stdlib wire format),
``_shm_transport`` + the C extension ``_core`` (shared-memory rings), ``_listener`` and
``_auth`` (sockets across machines), ``errors`` (the exception tree).
"""

from __future__ import annotations

from typing import Any

from ._core_status import CORE_ERROR, require_core_if_asked

require_core_if_asked()  # HYPERPIPE_REQUIRE_CORE=1: no silent fallback

from . import errors as errors
from ._connection import Connection as Connection
from ._context import get_context as get_context
from ._context import install as install
from ._context import uninstall as uninstall
from ._pipe import Pipe as Pipe
from ._select import available_transports, select_transport
from ._wait import WaitSet as WaitSet
from ._wait import wait as wait
from .errors import AuthenticationError as AuthenticationError
from .errors import BrokenPipeError as BrokenPipeError
from .errors import BufferTooShort as BufferTooShort
from .errors import ConnectionClosedError as ConnectionClosedError
from .errors import DirectionError as DirectionError
from .errors import HyperpipeError as HyperpipeError
from .errors import MessageTooLongError as MessageTooLongError
from .errors import PeerClosedError as PeerClosedError
from .errors import ProtocolError as ProtocolError
from .errors import TimeoutError as TimeoutError
from .errors import TruncatedMessageError as TruncatedMessageError

from ._listener import Client as Client
from ._listener import Listener as Listener

__version__ = "0.1.0"


def info() -> dict[str, Any]:
    """What this installation uses: version, default transport, all transports, C core state.

    ``core`` is ``"loaded"``, or ``"missing (why)"``: then ``Pipe()`` falls back to the socket
    transport and ``python -m hyperpipe`` says how to fix it.
    """
    return {
        "version": __version__,
        "transport": select_transport(None),
        "available_transports": available_transports(),
        "core": "loaded" if CORE_ERROR is None else f"missing ({CORE_ERROR})",
    }


__all__ = [
    "Pipe",
    "Connection",
    "Listener",
    "Client",
    "wait",
    "WaitSet",
    "info",
    "get_context",
    "install",
    "uninstall",
    "errors",
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

for _name in ("Connection", "Pipe", "wait", "WaitSet", "Listener", "Client", "get_context", "install", "uninstall"):
    globals()[_name].__module__ = "hyperpipe"
del _name
