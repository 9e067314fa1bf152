"""Run every seed tutorial program in examples/ with hyperpipe and with the stdlib original.

The examples differ from the tutorials only in the import of ``Pipe``; the stdlib variant
is made by substituting the import back. All runs are started at once (most of them sleep
for random times) in their own session, each with a timeout after which its whole process
group is killed, so a hang fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SEEDS = sorted(p.stem for p in EXAMPLES.glob("seed_*.py"))
# (name, environment): the stdlib original, hyperpipe's default transport, the socket one
VARIANTS = {
    "multiprocessing": {},
    "hyperpipe": {},
    "hyperpipe-socket": {"HYPERPIPE_TRANSPORT": "socket"},
}
TIMEOUT = 90.0
#: seed 000 hangs at exit under the stdlib; how long we give it before calling it hung
EXPECTED_HANG_TIMEOUT = 8.0


def stdlib_source(source: str) -> str:
    """Undo the one change made to the tutorial: import Pipe from multiprocessing again."""
    source = source.replace("from hyperpipe import Pipe", "from multiprocessing import Pipe")
    source = source.replace("import hyperpipe\n", "")
    source = source.replace("hyperpipe.Pipe(", "multiprocessing.Pipe(")
    assert "hyperpipe" not in source.replace("seeds/", "")
    return source


class Run:
    def __init__(self, seed: str, variant: str, workdir: Path) -> None:
        self.seed, self.variant = seed, variant
        path = EXAMPLES / f"{seed}.py"
        if variant == "multiprocessing":
            path = workdir / f"{seed}__stdlib.py"
            path.write_text(stdlib_source((EXAMPLES / f"{seed}.py").read_text()))
        env = dict(os.environ, **VARIANTS[variant])
        if variant != "hyperpipe-socket":
            env.pop("HYPERPIPE_TRANSPORT", None)
        env.pop("PYTHONUNBUFFERED", None)
        if seed.startswith("seed_000"):
            # its output must survive the kill when it hangs; elsewhere unbuffered output
            # would split print() into two writes that other processes' lines interleave
            env["PYTHONUNBUFFERED"] = "1"
        self.timeout = EXPECTED_HANG_TIMEOUT if self.expected_to_hang else TIMEOUT
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(workdir),
            start_new_session=True,  # its own process group: killable with its children
        )
        self.result: "tuple[bool, int, str, str, bool] | None" = None

    @property
    def expected_to_hang(self) -> bool:
        return self.seed.startswith("seed_000") and self.variant == "multiprocessing"

    def finish(self) -> "tuple[bool, int, str, str, bool]":
        """(timed_out, returncode, stdout, stderr, left_processes_behind)"""
        if self.result is None:
            remaining = max(0.1, self.started + self.timeout - time.monotonic())
            timed_out = False
            try:
                out, err = self.proc.communicate(timeout=remaining)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(self.proc.pid, signal.SIGKILL)
                out, err = self.proc.communicate(timeout=30)
            leftovers = False
            if not timed_out:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    leftovers = True
                except ProcessLookupError:
                    pass
            self.result = (timed_out, self.proc.returncode, out.decode(), err.decode(), leftovers)
        return self.result


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("examples")
    # start (all at once) only the runs that the selected tests will check
    wanted = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = getattr(item, "originalname", item.name)
        if item.fspath == request.fspath and "variant" in params:
            wanted.add((name[len("test_"):], params["variant"]))
    started = {
        (seed, variant): Run(seed, variant, workdir)
        for seed in SEEDS
        for variant in VARIANTS
        if (seed, variant) in wanted
    }
    yield started
    for run in started.values():
        run.finish()


def completed(runs, seed, variant):
    timed_out, code, out, err, leftovers = runs[(seed, variant)].finish()
    assert not timed_out, f"{seed} [{variant}] did not finish within {TIMEOUT} s\n{out}\n{err}"
    assert code == 0, f"{seed} [{variant}] exited with {code}\n{err}"
    assert not leftovers, f"{seed} [{variant}] left processes running"
    return out.splitlines(), err


def test_every_seed_program_is_here():
    assert len(SEEDS) == 7, SEEDS


def test_examples_change_only_the_import():
    for seed in SEEDS:
        source = (EXAMPLES / f"{seed}.py").read_text()
        hyperpipe_lines = [line for line in source.splitlines() if "hyperpipe" in line]
        assert hyperpipe_lines, seed
        for line in hyperpipe_lines:
            assert re.fullmatch(
                r"import hyperpipe|from hyperpipe import Pipe|.*hyperpipe\.Pipe\(.*\)", line
            ), (seed, line)


@pytest.mark.deliberate_difference(
    "at interpreter exit hyperpipe closes its connections before multiprocessing joins the "
    "children, so a child blocked in recv gets EOFError instead of hanging the exit"
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_seed_000_parent_child_commands(runs, variant):
    seed = "seed_000_parent_child_commands"
    if variant == "multiprocessing":
        # the stdlib hangs: at exit multiprocessing joins the child, which blocks in recv
        # forever because the parent still holds parent_conn
        timed_out, code, out, err, _ = runs[(seed, variant)].finish()
        assert timed_out, f"expected the stdlib original to hang, it ended with {code}\n{err}"
        assert out.splitlines() == ["f1!", "f2!"]
        return
    # deliberate difference: hyperpipe closes its connections at interpreter exit before
    # multiprocessing joins the children, so the child gets EOFError and the program ends
    lines, err = completed(runs, seed, variant)
    assert lines == ["f1!", "f2!"]
    # the child's traceback: its recv loop has no other way to stop
    assert "EOFError" in err or "PeerClosedError" in err, err


@pytest.mark.parametrize("variant", VARIANTS)
def test_seed_001_parent_to_child(runs, variant):
    lines, _ = completed(runs, "seed_001_parent_to_child", variant)
    assert lines == ["Child received: Welcome to TutorialsPoint"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_seed_001_bidirectional(runs, variant):
    lines, _ = completed(runs, "seed_001_bidirectional", variant)
    # two processes print to one pipe, each flushing at its exit: any order
    assert sorted(lines) == ["Child received: Same to you!", "Parent received: Have a nice day!"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_seed_002_one_process(runs, variant):
    lines, err = completed(runs, "seed_002_one_process", variant)
    assert lines == ["Hello from Parent"]
    assert err == ""


@pytest.mark.parametrize("variant", VARIANTS)
def test_seed_003_son_process(runs, variant):
    lines, err = completed(runs, "seed_003_son_process", variant)
    assert lines == [str(x) for x in range(1000)] + ["Main process is done"]
    assert err == ""


@pytest.mark.parametrize("variant", VARIANTS)
def test_seed_004_sender_receiver(runs, variant):
    lines, err = completed(runs, "seed_004_sender_receiver", variant)
    assert err == ""
    assert sorted(lines[:2]) == ["Receiver: Running", "Sender: Running"]
    got = [line for line in lines if line.startswith(">receiver got ")]
    assert len(got) == 11 and got[-1] == ">receiver got None"
    values = [float(line.split()[-1]) for line in got[:-1]]
    assert all(0 <= v < 1 for v in values)
    assert set(lines) - set(got) == {"Sender: Running", "Receiver: Running", "Sender: Done", "Receiver: Done"}
    assert lines[-1] in ("Receiver: Done", "Sender: Done")


@pytest.mark.parametrize("variant", VARIANTS)
def test_seed_004_duplex_pingpong(runs, variant):
    lines, err = completed(runs, "seed_004_duplex_pingpong", variant)
    assert err == ""
    assert lines.count("Process Running") == 2 and lines.count("Process Done") == 2
    sent = [float(line.split()[-1]) for line in lines if line.startswith(">sending ")]
    received = [float(line.split()[-1]) for line in lines if line.startswith(">received ")]
    # every value received was sent, in order, and the values only grow until past 10
    assert received == sent[: len(received)]
    assert sent == sorted(sent) and received[-1] > 10
    assert len(sent) == len(received) + 1
