"""Nothing sent before a process exits is lost, and the exit still ends (docs/design.md,
"Lifecycle"). For every implementation, under fork, spawn and forkserver.

The exit of a child started by multiprocessing is checked in-process; the exit of a main
process (threads joined first, then atexit handlers, then multiprocessing's finalizers) in
a fresh interpreter, whose reader child reports what arrived.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import subprocess
import sys
import textwrap

import pytest

import helpers
from helpers import CHILD_TIMEOUT

COUNT = 1000


def recv_all_then_eof(conn, count):
    got = []
    for _ in range(count):
        assert conn.poll(CHILD_TIMEOUT), f"only {len(got)} of {count} messages arrived"
        got.append(conn.recv())
    assert got == [("item", i) for i in range(count)]
    assert conn.poll(CHILD_TIMEOUT), "no EOF after the last message"
    with pytest.raises(EOFError):
        conn.recv()


@pytest.mark.parametrize(
    "sender", [helpers.child_send_then_exit, helpers.child_sends_from_a_thread_then_returns]
)
def test_what_a_child_sends_as_it_exits_arrives_then_eof(impl, ctx, procs, pipe, sender):
    reader, writer = pipe(duplex=False)
    proc = procs.start(ctx, sender, writer, COUNT)
    writer.close()
    recv_all_then_eof(reader, COUNT)
    proc.join(CHILD_TIMEOUT)
    assert proc.exitcode == 0


def test_a_queue_feeder_flushes_before_the_child_exits(impl, ctx, procs, monkeypatch):
    # The repro: a child puts and returns; its Queue's Pipe is the implementation's.
    if not impl.is_stdlib:
        monkeypatch.setattr(multiprocessing.connection, "Pipe", impl.Pipe)
    queue = ctx.Queue()
    try:
        proc = procs.start(ctx, helpers.child_puts_on_a_queue_then_returns, queue, COUNT)
        got = [queue.get(timeout=CHILD_TIMEOUT) for _ in range(COUNT)]
        assert got == [("item", i) for i in range(COUNT)]
        proc.join(CHILD_TIMEOUT)
        assert proc.exitcode == 0
    finally:
        queue.close()
        queue.join_thread()


# A main process that sends in one of three ways and exits; its reader child prints what
# arrived. The atexit handler is registered before `import hyperpipe` but after
# multiprocessing.util (which registers multiprocessing's exit function, and which any use
# of multiprocessing imports): atexit runs it first, as with the stdlib.
MAIN_EXITS = textwrap.dedent(
    """
    import atexit, functools, multiprocessing, multiprocessing.util, sys, threading, time
    impl, method, how, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def send_all():
        for i in range(count):
            writer.send(("item", i))

    if how == "atexit":
        atexit.register(send_all)

    if impl == "multiprocessing":
        Pipe = multiprocessing.Pipe
    else:
        import hyperpipe
        Pipe = functools.partial(hyperpipe.Pipe, transport=impl.split("-", 1)[1])

    def read(reader, writer, count, expect_eof):
        writer.close()
        got = 0
        for _ in range(count):
            if not reader.poll(30):
                break
            got += reader.recv() == ("item", got)
        ending = "-"
        if expect_eof and reader.poll(30):
            try:
                reader.recv()
                ending = "more"
            except EOFError:
                ending = "EOF"
        print(got, ending, flush=True)

    if __name__ == "__main__":
        ctx = multiprocessing.get_context(method)
        reader, writer = Pipe(duplex=False)
        # The stdlib never closes the writer at exit (it would hang waiting for EOF).
        child = ctx.Process(target=read, args=(reader, writer, count, impl != "multiprocessing"))
        child.start()
        reader.close()
        if how == "main":
            send_all()
        elif how == "thread":
            threading.Thread(target=lambda: (time.sleep(0.2), send_all())).start()
    """
)


@pytest.mark.parametrize("how", ["main", "thread", "atexit"])
def test_what_a_main_process_sends_as_it_exits_arrives(impl, ctx, how, tmp_path):
    script = tmp_path / "main_exits.py"
    script.write_text(MAIN_EXITS)
    method = ctx.get_start_method()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run(
        [sys.executable, str(script), impl.name, method, how, str(COUNT)],
        capture_output=True,
        text=True,
        timeout=2 * CHILD_TIMEOUT,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    ending = "-" if impl.is_stdlib else "EOF"
    assert run.stdout.split() == [str(COUNT), ending], run.stderr


COUNT_FORKS = textwrap.dedent(
    """
    import os, sys
    import hyperpipe
    transport = sys.argv[1]
    cls = type(hyperpipe.Pipe(transport=transport)[0]._transport)
    calls = []
    original = cls.after_fork_in_child
    cls.after_fork_in_child = lambda self: (calls.append(self), original(self))[1]
    pipes = [hyperpipe.Pipe(transport=transport), hyperpipe.Pipe(False, transport=transport)]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, b"%d %d" % (len(calls), len({id(t) for t in calls})))
        os._exit(0)
    os.waitpid(pid, 0)
    print(os.read(r, 100).decode())
    """
)


@pytest.mark.parametrize("transport", ["shm", "socket"])
def test_after_fork_in_child_runs_once_per_end(transport, tmp_path):
    from hyperpipe import _select

    if transport not in _select.available_transports():
        pytest.skip(f"no {transport} transport here")
    script = tmp_path / "count_forks.py"
    script.write_text(COUNT_FORKS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run(
        [sys.executable, str(script), transport], capture_output=True, text=True, timeout=60, env=env
    )
    assert run.returncode == 0, run.stderr
    # five live ends (the first Pipe's two were dropped): each renewed once
    assert run.stdout.split() == ["4", "4"], run.stdout
