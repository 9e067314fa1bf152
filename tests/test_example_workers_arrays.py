"""examples/workers_send_arrays.py: zero-copy arrays from several workers, read with a WaitSet."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hyperpipe import _select

pytest.importorskip("numpy")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "workers_send_arrays.py"


@pytest.mark.skipif("shm" not in _select.available_transports(), reason="needs the shared-memory transport")
def test_workers_send_arrays_example() -> None:
    # 3 workers x 40 arrays of 2 MiB; the example checks every array itself and fails
    # (an AssertionError on stderr, a non-zero exit) on a wrong one.
    proc = subprocess.run([sys.executable, str(EXAMPLE), "3", "40", "2"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert re.fullmatch(r"3 workers sent 240 MiB of arrays in [\d.]+ s \([\d.]+ GB/s\), every array checked\n",
                        proc.stdout), proc.stdout
