"""examples/pool_executor_one_line.py: the one-line speed-up runs, with and without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pool_executor_one_line.py"


@pytest.mark.parametrize("args, says", [([], "hyperpipe"), (["--stdlib"], "standard library")])
def test_pool_executor_one_line_example(args, says):
    pytest.importorskip("numpy")
    # its own session: a hang is killed by the timeout, with its workers
    done = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True,
                          timeout=120, start_new_session=True)
    assert done.returncode == 0, done.stderr
    assert "24 arrays of 8 MiB normalised" in done.stdout and f"({says})" in done.stdout


def test_the_example_differs_from_a_plain_executor_program_by_one_line():
    source = EXAMPLE.read_text()
    calls = [line for line in source.splitlines() if line.strip().startswith("hyperpipe.install()")]
    assert len(calls) == 1
    assert "mp_context" not in source  # the executor is built as any program builds it
