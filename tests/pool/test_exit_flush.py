"""A main program that puts more than the ring holds and returns at once: its feeder thread
must deliver everything at exit, before anything closes the connections."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent('''
    import multiprocessing, sys, time
    import hyperpipe

    def consume(q, n, started):
        started.set()
        time.sleep(0.5)  # the producer fills the ring and its feeder meanwhile, then returns
        got = [q.get(timeout=30) for _ in range(n)]
        assert got == [(i, bytes([i % 251]) * 2048) for i in range(n)]
        print("consumer got", n, flush=True)

    if __name__ == "__main__":
        method, flavor = sys.argv[1], sys.argv[2]
        ctx = (hyperpipe.get_context if flavor == "hyperpipe" else multiprocessing.get_context)(method)
        q = ctx.Queue()
        started = ctx.Event()
        ctx.Process(target=consume, args=(q, 1000, started)).start()
        started.wait(30)  # (the stdlib fails when main ends before a spawned child unpickled its locks)
        for i in range(1000):  # 2 MB: most of it is still in the feeder when main returns
            q.put((i, bytes([i % 251]) * 2048))
''')


@pytest.mark.parametrize("flavor", ["multiprocessing", "hyperpipe"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_main_returns_with_items_in_the_feeder(tmp_path, flavor, method):
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    done = subprocess.run([sys.executable, str(script), method, flavor], capture_output=True, text=True,
                          timeout=90, start_new_session=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "consumer got 1000", done.stderr
