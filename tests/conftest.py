"""Fixtures for the behaviour suite: one set of tests, run against every implementation.

``impl`` is parametrised over the standard library (the reference) and each hyperpipe
transport; ``ctx`` over the start methods. A test that uses ``impl`` also gets

- a watchdog: SIGALRM interrupts the main thread after ``WATCHDOG_SECONDS`` (the test fails
  instead of hanging; pytest's ``faulthandler_timeout`` dumps the stacks later still);
- child reaping: processes started through ``procs`` are joined with a timeout and killed if
  still alive, and any other live child fails the test;
- a file-descriptor leak check (lazily created multiprocessing globals excepted).

``@pytest.mark.deliberate_difference("why")`` marks behaviour where hyperpipe differs from the
standard library on purpose (or a hyperpipe-only feature): it is skipped for the stdlib with
the reason, and ``pytest -m deliberate_difference --collect-only`` lists all of them.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    # helpers.py must be importable by name here and in spawn/forkserver children
    sys.path.insert(0, TESTS_DIR)

import helpers  # noqa: E402
from impls import IMPLEMENTATIONS, Impl, make_impl  # noqa: E402,F401

WATCHDOG_SECONDS = 60.0
HUGE_WATCHDOG_SECONDS = 1800.0
JOIN_TIMEOUT = 30.0

START_METHODS = ["fork", "spawn", "forkserver"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deliberate_difference(reason): hyperpipe differs from multiprocessing on purpose "
        "(or the feature is hyperpipe-only); skipped for the stdlib",
    )




@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> Impl:
    return make_impl(request.param)


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> Any:
    return multiprocessing.get_context(request.param)


OPT_IN_MARKERS = ("huge", "stress", "asan")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``huge``, ``stress`` and ``asan`` tests run only when ``-m`` names them."""
    markexpr = config.getoption("markexpr", "") or ""
    for name in OPT_IN_MARKERS:
        if name in markexpr:
            continue
        skip = pytest.mark.skip(reason=f"opt-in: run with -m {name}")
        for item in items:
            if item.get_closest_marker(name) is not None:
                item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("deliberate_difference")
    callspec = getattr(item, "callspec", None)
    if marker is not None and callspec is not None and callspec.params.get("impl") == "multiprocessing":
        reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
        pytest.skip(f"deliberate difference from multiprocessing: {reason}")


# -- child processes --------------------------------------------------------------------


class ProcessStarter:
    """Starts children for one test; teardown joins them with a timeout and kills leftovers."""

    def __init__(self) -> None:
        self.processes: list[Any] = []

    def start(self, ctx: Any, target: Callable[..., Any], *args: Any) -> Any:
        proc = ctx.Process(target=target, args=args, daemon=True)
        proc.start()
        self.processes.append(proc)
        return proc

    def join_all(self, timeout: float = JOIN_TIMEOUT) -> list[str]:
        """Join every child; kill those still running. Returns problems found."""
        problems = []
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                problems.append(f"child {proc.pid} ({proc.name}) still alive: killed")
                proc.kill()
                proc.join(5)
        for proc in self.processes:
            try:
                proc.close()
            except ValueError:
                pass
        self.processes.clear()
        return problems


@pytest.fixture
def procs() -> Iterator[ProcessStarter]:
    starter = ProcessStarter()
    yield starter
    problems = starter.join_all()
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture
def pipe(impl: Impl, procs: ProcessStarter) -> Iterator[Callable[..., Any]]:
    """``impl.Pipe``, whose connections are all closed at teardown, even if the test failed.

    Depends on ``procs`` so that it is torn down first: closing the parent's ends lets a
    child still waiting on them see EOF and exit before ``procs`` joins it.
    """
    made: list[Any] = []

    def make(*args: Any, **kwargs: Any) -> Any:
        pair = impl.Pipe(*args, **kwargs)
        made.extend(pair)
        return pair

    yield make
    for conn in made:
        try:
            conn.close()
        except OSError:
            pass


# -- watchdog, leftover children and fd leaks -------------------------------------------


class WatchdogTimeout(Exception):
    """The test ran longer than its watchdog allows (probably a hang)."""


def _alarm(signum: int, frame: Any) -> None:
    raise WatchdogTimeout(f"test exceeded the {WATCHDOG_SECONDS:.0f} s watchdog (a hang?)")


def _fd_table() -> dict[int, str]:
    table = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            table[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the fd of the listdir itself, or closed meanwhile
    return table


def _lazy_global_fds() -> set[int]:
    """Descriptors multiprocessing creates once and keeps for the process' life."""
    fds: set[int] = set()
    from multiprocessing import forkserver, resource_sharer, resource_tracker

    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if alive is not None:
        fds.add(alive)
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    if getattr(tracker, "_fd", None) is not None:
        fds.add(tracker._fd)
    sharer = getattr(resource_sharer, "_resource_sharer", None)
    listener = getattr(sharer, "_listener", None)
    if listener is not None:
        try:
            fds.add(listener._listener._socket.fileno())
        except (AttributeError, OSError):
            pass
    return fds


def _leaked(before: dict[int, str]) -> dict[int, str]:
    after = _fd_table()
    ignore = _lazy_global_fds()
    return {
        fd: target
        for fd, target in after.items()
        if fd not in ignore and before.get(fd) != target
    }


#: Watchdog of the tests that do not use ``impl`` (those have the guard below).
OTHER_WATCHDOG_SECONDS = 180.0
LONG_WATCHDOG_SECONDS = 1800.0  # opt-in stress/asan/huge runs


def _other_alarm(signum: int, frame: Any) -> None:
    raise WatchdogTimeout("test exceeded its watchdog (a hang?)")


@contextlib.contextmanager
def _armed(seconds: float, alarm: Any) -> Iterator[None]:
    """A SIGALRM watchdog (main thread only) whose handler raises in the test, and behind it
    a last resort: if that exception is swallowed (an event loop written in C, such as
    uvloop, logs exceptions raised in its callbacks and goes on), dump every thread's stack
    and end the run 60 s later, so CI fails with the hang's location instead of hanging."""
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + 60, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every other test fails instead of hanging the suite (faulthandler only dumps stacks)."""
    if "impl" in request.fixturenames or threading.current_thread() is not threading.main_thread():
        yield
        return
    node = request.node
    long_run = any(node.get_closest_marker(m) for m in ("huge", "stress", "asan"))
    with _armed(LONG_WATCHDOG_SECONDS if long_run else OTHER_WATCHDOG_SECONDS, _other_alarm):
        yield


@pytest.fixture(autouse=True)
def _conformance_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    if "impl" not in request.fixturenames:
        yield
        return
    in_main_thread = threading.current_thread() is threading.main_thread()
    seconds = HUGE_WATCHDOG_SECONDS if request.node.get_closest_marker("huge") else WATCHDOG_SECONDS
    gc.collect()
    before = _fd_table()
    children_before = {p.pid for p in multiprocessing.active_children()}
    with _armed(seconds, _alarm) if in_main_thread else contextlib.nullcontext():
        yield
    problems = []
    for proc in multiprocessing.active_children():
        if proc.pid in children_before:
            continue
        proc.join(JOIN_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
            problems.append(f"leftover child {proc.pid} ({proc.name}) was killed")
    # descriptors may close a little later (resource_sharer threads, finalizers)
    deadline = time.monotonic() + 2.0
    while True:
        gc.collect()
        leaked = _leaked(before)
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if leaked:
        problems.append(f"file descriptors leaked: {leaked}")
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture
def run_in_thread() -> Iterator[Callable[..., threading.Thread]]:
    """Start a daemon thread; teardown fails the test if one is still running."""
    threads: list[threading.Thread] = []

    def start(target: Callable[..., Any], *args: Any) -> threading.Thread:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                target(*args)
            except BaseException as exc:  # reported by the test through .errors
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.errors = errors  # type: ignore[attr-defined]
        thread.start()
        threads.append(thread)
        return thread

    yield start
    stuck = []
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
        if thread.is_alive():
            stuck.append(thread.name)
    if stuck:
        pytest.fail(f"threads still running after the test: {stuck}")


__all__ = ["Impl", "ProcessStarter", "helpers"]
