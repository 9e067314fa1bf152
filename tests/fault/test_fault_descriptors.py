"""Descriptor exhaustion: a clear ``OSError`` (errno ``EMFILE``) and nothing else broken.

Each scenario runs in a forked child whose ``RLIMIT_NOFILE`` is lowered to a little above
what it holds, so the test process keeps its descriptors; the child fills the rest with
``/dev/null`` and reports what it saw over a standard-library pipe opened before.

- ``Pipe()`` with 0, 1, 2... descriptors free: it works, or fails with ``EMFILE`` and
  leaves no descriptor behind (a pair half made is undone); with descriptors back, it works.
- A big out-of-band shm message with no descriptor free, on the sending side and on the
  receiving side: it arrives whole, or the call fails with ``EMFILE``; once descriptors
  are back, the message arrives whole (nothing lost, never a ``ProtocolError``).
- ``Listener.accept()``: ``EMFILE``, no spinning until the timeout; the listener still works
  and accepts the client that was waiting.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import resource
import traceback
from typing import Any, Callable

import pytest
from fault_helpers import (
    COUNTS,
    STEP_TIMEOUT,
    TRANSPORTS,
    MiB,
    fd_table,
    bounded_join,
    check_message,
    checked_message,
    exhaust_descriptors,
)

import hyperpipe

_fork = multiprocessing.get_context("fork")
#: Descriptors a child may open beyond those it inherits (before it fills them all).
HEADROOM = 64
#: ``Pipe()`` is tried with this many descriptors free, 0 to 15.
MOST_FREE = 16
BIG = 1 * MiB


def _describe(exc: BaseException) -> dict:
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "errno": getattr(exc, "errno", None),
        "message": str(exc),
        "protocol": isinstance(exc, hyperpipe.ProtocolError),
    }


def _report(channel: Any, scenario: Callable[..., dict], *args: Any) -> None:
    highest = max(fd_table())
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + HEADROOM, hard))
    try:
        result = scenario(channel, *args)
    except BaseException:
        result = {"crash": traceback.format_exc()}
    channel.send(result)


def _in_child(scenario: Callable[..., dict], *args: Any, parent_side: Callable[[Any], None] = lambda c: None) -> dict:
    ours, theirs = multiprocessing.Pipe()  # the standard library's, opened before the limit
    proc = _fork.Process(target=_report, args=(theirs, scenario, *args), daemon=True)
    try:
        proc.start()
        theirs.close()
        parent_side(ours)
        assert ours.poll(STEP_TIMEOUT), "the child hung"
        report = ours.recv()
    finally:
        ours.close()
        if proc.pid is not None:
            bounded_join(proc)
    assert "crash" not in report, report.get("crash")
    return report


def _assert_says_descriptors_ran_out(error: dict) -> None:
    assert error["errno"] == errno.EMFILE, f"errno {error['errno']}, not EMFILE: {error}"
    assert not error["protocol"], f"a resource error reported as a protocol error: {error}"
    assert any(word in error["message"].lower() for word in ("descriptor", "open files")), error


def _new_descriptors(before: dict, opened: list[int]) -> dict:
    os.close(opened.pop())  # listing /proc/self/fd takes a descriptor
    return {fd: path for fd, path in fd_table().items() if before.get(fd) != path and fd not in opened}


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


def _round_trip(transport: str) -> bool:
    a, b = hyperpipe.Pipe(transport=transport)
    with a, b:
        a.send_bytes(checked_message(7, 4096), timeout=STEP_TIMEOUT)  # fits any buffer
        check_message(b.recv_bytes(timeout=STEP_TIMEOUT), 7, 4096)
    return True


# -- Pipe() ------------------------------------------------------------------------------


def _pipe_with_few_descriptors(channel: Any, transport: str) -> dict:
    before = fd_table()
    opened = exhaust_descriptors()
    outcomes: list[Any] = []
    leaks = []
    for free in range(MOST_FREE):
        for _ in range(free):
            os.close(opened.pop())
        try:
            pair = hyperpipe.Pipe(transport=transport)
        except OSError as exc:
            outcomes.append(_describe(exc))
        else:
            outcomes.append("made")
            for conn in pair:
                conn.close()
        leaked = _new_descriptors(before, opened)
        if leaked:
            leaks.append((free, leaked))
        opened += exhaust_descriptors()
    _close_all(opened)
    return {"outcomes": outcomes, "leaks": leaks, "works_after": _round_trip(transport)}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pipe_with_few_descriptors(transport: str) -> None:
    report = _in_child(_pipe_with_few_descriptors, transport)
    outcomes = report["outcomes"]
    assert outcomes[0] != "made", "Pipe() made a pair with no descriptor free"
    for outcome in outcomes:
        if outcome != "made":
            _assert_says_descriptors_ran_out(outcome)
    assert "made" in outcomes, f"Pipe() failed even with {MOST_FREE - 1} descriptors free"
    assert report["leaks"] == [], "a failed Pipe() left descriptors open"
    assert report["works_after"]
    COUNTS["descriptor-exhaustion cases"] += len(outcomes)


# -- a big shm message -------------------------------------------------------------------


def _oob_pipe() -> Any:
    """An shm pair whose big messages each travel in their own memfd (no shared heap)."""
    try:
        return hyperpipe.Pipe(transport="shm", heap_size=0)
    except TypeError:
        pytest.skip("the shm transport has no heap_size option any more")


def _big_send_with_no_descriptor(channel: Any) -> dict:
    a, b = _oob_pipe()
    with a, b:
        opened = exhaust_descriptors()
        error = receive_error = first = None
        try:
            a.send_bytes(checked_message(1, BIG), timeout=STEP_TIMEOUT)
            sent = True
        except OSError as exc:
            error, sent = _describe(exc), False
        if sent or b.poll(0):
            try:
                first = b.recv_bytes(timeout=0.5)
            except OSError as exc:
                receive_error = _describe(exc)
        _close_all(opened)
        if not sent:
            a.send_bytes(checked_message(1, BIG), timeout=STEP_TIMEOUT)
        check_message(first if first is not None else b.recv_bytes(timeout=5.0), 1, BIG)
        return {"error": error, "receive_error": receive_error, "left_over": b.poll(0)}


def test_big_shm_send_with_no_descriptor() -> None:
    for conn in _oob_pipe():
        conn.close()
    report = _in_child(_big_send_with_no_descriptor)
    for error in (report["error"], report["receive_error"]):
        if error is not None:
            _assert_says_descriptors_ran_out(error)
    assert not report["left_over"], "more than the one message arrived"
    COUNTS["descriptor-exhaustion cases"] += 1


def _big_receive_with_no_descriptor(channel: Any, b: Any) -> dict:
    opened = exhaust_descriptors()
    channel.send("full")
    assert channel.poll(STEP_TIMEOUT) and channel.recv() == "sent"
    try:
        check_message(b.recv_bytes(timeout=STEP_TIMEOUT), 2, BIG)
        error = None
    except OSError as exc:
        error = _describe(exc)
    _close_all(opened)
    if error is not None:  # the message must still be there
        try:
            check_message(b.recv_bytes(timeout=1.0), 2, BIG)
        except hyperpipe.TimeoutError:
            return {"error": error, "lost": True}
    return {"error": error, "lost": False}


def test_big_shm_receive_with_no_descriptor() -> None:
    a, b = _oob_pipe()

    def send_when_full(channel: Any) -> None:
        assert channel.poll(STEP_TIMEOUT) and channel.recv() == "full"
        b.close()  # the child's copy is the receiver
        a.send_bytes(checked_message(2, BIG), timeout=STEP_TIMEOUT)
        channel.send("sent")

    with a, b:
        report = _in_child(_big_receive_with_no_descriptor, b, parent_side=send_when_full)
    if report["error"] is not None:
        _assert_says_descriptors_ran_out(report["error"])
    assert not report["lost"], f"the message was lost after {report['error']}"
    COUNTS["descriptor-exhaustion cases"] += 1


# -- accept() ----------------------------------------------------------------------------


def _accept_with_no_descriptor(channel: Any) -> dict:
    with hyperpipe.Listener(("127.0.0.1", 0)) as listener:
        with hyperpipe.Client(listener.address, timeout=STEP_TIMEOUT) as client:
            client.send("waiting in the backlog")
            opened = exhaust_descriptors()
            try:
                listener.accept(timeout=2.0).close()
                error = None
            except OSError as exc:
                error = _describe(exc)
            _close_all(opened)
            with listener.accept(timeout=STEP_TIMEOUT) as served:
                got = served.recv(timeout=STEP_TIMEOUT)
    return {"error": error, "got": got}


def test_accept_with_no_descriptor() -> None:
    report = _in_child(_accept_with_no_descriptor)
    assert report["error"] is not None, "accept() made a connection with no descriptor free"
    _assert_says_descriptors_ran_out(report["error"])
    assert report["got"] == "waiting in the backlog"
    COUNTS["descriptor-exhaustion cases"] += 1
