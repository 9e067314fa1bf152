"""The implementations the behaviour suite runs against (a module, not conftest, so that
test files in any folder can import it unambiguously)."""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import multiprocessing.connection
from types import ModuleType
from typing import Any, Callable, Optional

import pytest

IMPLEMENTATIONS = ["multiprocessing", "hyperpipe-socket", "hyperpipe-shm"]


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation under test, with the names a user would import from it."""

    name: str
    Pipe: Callable[..., Any]
    wait: Callable[..., Any]
    Connection: type
    BufferTooShort: type
    #: the class of timeout errors raised by ``timeout=`` (None for the stdlib)
    TimeoutError: Optional[type]
    module: ModuleType
    transport: Optional[str]

    @property
    def is_stdlib(self) -> bool:
        return self.name == "multiprocessing"

    def __repr__(self) -> str:
        return f"Impl({self.name})"


def make_impl(name: str) -> Impl:
    if name == "multiprocessing":
        return Impl(
            name=name,
            Pipe=multiprocessing.Pipe,
            wait=multiprocessing.connection.wait,
            Connection=multiprocessing.connection.Connection,
            BufferTooShort=multiprocessing.BufferTooShort,
            TimeoutError=None,
            module=multiprocessing.connection,
            transport=None,
        )
    import hyperpipe
    from hyperpipe import _select

    transport = name.split("-", 1)[1]
    if transport not in _select.available_transports():
        pytest.skip(
            f"transport {transport!r} is not available here "
            f"(available: {_select.available_transports()})"
        )
    return Impl(
        name=name,
        Pipe=functools.partial(hyperpipe.Pipe, transport=transport),
        wait=hyperpipe.wait,
        Connection=hyperpipe.Connection,
        BufferTooShort=hyperpipe.BufferTooShort,
        TimeoutError=hyperpipe.TimeoutError,
        module=hyperpipe,
        transport=transport,
    )
