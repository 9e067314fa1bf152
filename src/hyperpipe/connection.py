"""Mirror of ``multiprocessing.connection``: ``import hyperpipe.connection as connection``."""

from ._connection import Connection
from ._listener import Client, Listener
from ._pipe import Pipe
from ._wait import wait
from .errors import AuthenticationError, BufferTooShort

__all__ = ["Client", "Listener", "Pipe", "wait", "Connection", "BufferTooShort", "AuthenticationError"]
