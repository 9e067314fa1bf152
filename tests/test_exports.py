"""The public facade: ``hyperpipe.__all__`` is exactly the documented list, and every public
name is what it claims to be (public ``__module__``, docstring, stdlib-compatible bases)."""

from __future__ import annotations

import builtins
import inspect
import multiprocessing
import multiprocessing.connection
import types

import pytest

import hyperpipe

# The documented public surface (README "API"): keep this list and the README in step.
DOCUMENTED = {
    "Pipe",
    "Connection",
    "Listener",
    "Client",
    "wait",
    "WaitSet",
    "info",
    # multiprocessing integration (docs/pool.md)
    "get_context",
    "install",
    "uninstall",
    # exceptions (errors.py)
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
}
# public submodules re-exported by name
DOCUMENTED_SUBMODULES = {"errors"}

ERROR_NAMES = {
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
}

# what each exception must also be, so that existing `except` clauses keep working
STDLIB_BASES = {
    "BufferTooShort": multiprocessing.BufferTooShort,
    "AuthenticationError": multiprocessing.AuthenticationError,
    "TimeoutError": (builtins.TimeoutError, multiprocessing.TimeoutError),
    "PeerClosedError": EOFError,
    "TruncatedMessageError": (EOFError, OSError),
    "BrokenPipeError": builtins.BrokenPipeError,
    "ConnectionClosedError": OSError,
    "DirectionError": OSError,
    "MessageTooLongError": OSError,
    "ProtocolError": OSError,
}


def test_all_is_the_documented_list():
    assert len(hyperpipe.__all__) == len(set(hyperpipe.__all__)), "duplicates in __all__"
    assert set(hyperpipe.__all__) == DOCUMENTED | DOCUMENTED_SUBMODULES


def test_star_import_gives_every_name():
    namespace: dict = {}
    exec("from hyperpipe import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(hyperpipe.__all__)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_public_names_live_at_a_public_path_and_have_docstrings(name):
    obj = getattr(hyperpipe, name)
    assert obj.__module__.startswith("hyperpipe"), (name, obj.__module__)
    assert not obj.__module__.split(".")[-1].startswith("_"), (name, obj.__module__)
    assert inspect.getdoc(obj), f"{name} has no docstring"


@pytest.mark.parametrize("name", sorted(DOCUMENTED_SUBMODULES))
def test_public_submodules(name):
    module = getattr(hyperpipe, name)
    assert isinstance(module, types.ModuleType)
    assert module.__name__ == f"hyperpipe.{name}"
    for exported in getattr(module, "__all__", []):
        assert getattr(module, exported) is getattr(hyperpipe, exported)


def test_errors_module_lists_the_same_exceptions():
    assert set(hyperpipe.errors.__all__) == ERROR_NAMES


@pytest.mark.parametrize("name", sorted(ERROR_NAMES))
def test_exceptions_share_one_root_and_inherit_the_stdlib_ones(name):
    cls = getattr(hyperpipe, name)
    assert issubclass(cls, hyperpipe.HyperpipeError)
    assert issubclass(cls, Exception)
    if name in STDLIB_BASES:
        assert issubclass(cls, STDLIB_BASES[name])
    instance = cls()  # constructible without arguments, like the stdlib ones
    assert isinstance(instance, hyperpipe.HyperpipeError)


def test_connection_module_mirrors_multiprocessing_connection():
    import hyperpipe.connection as connection

    assert set(multiprocessing.connection.__all__) <= set(connection.__all__)
    for name in connection.__all__:
        assert getattr(connection, name) is getattr(hyperpipe, name), name


def test_info_reports_the_transport():
    info = hyperpipe.info()
    assert info["transport"] in info["available_transports"]
    assert set(info["available_transports"]) <= {"shm", "socket"}
    assert "socket" in info["available_transports"]
    assert info["core"] == "loaded" or info["core"].startswith("missing (")
    assert ("shm" in info["available_transports"]) <= (info["core"] == "loaded")  # shm needs the core
    a, b = hyperpipe.Pipe()
    with a, b:
        assert a.transport == info["transport"]
