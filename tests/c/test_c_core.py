"""Compile tests/c/test_ring.c against the C core with gcc and run it (plain, ASan, TSan)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "src" / "hyperpipe" / "csrc"
TEST_C = Path(__file__).with_name("test_ring.c")

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def build_and_run(tmp_path: Path, extra_flags: list[str], count: int) -> str:
    exe = tmp_path / "test_ring"
    cmd = [
        "gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-Wno-tsan", "-D_GNU_SOURCE", "-g",
        f"-I{CSRC}", str(TEST_C), *map(str, sorted(CSRC.glob("*.c"))),
        "-o", str(exe), "-lpthread", *extra_flags,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = subprocess.run([str(exe), str(count)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all ok" in result.stdout
    return result.stdout + result.stderr


def test_c_ring(tmp_path: Path) -> None:
    out = build_and_run(tmp_path, ["-O2"], 200_000)
    names = ("header checks", "heap", "single thread", "two threads", "two processes", "killed producer",
             "writer readiness", "hostile producer", "hostile consumer", "hostile endpoint", "hostile heap")  # fmt: skip
    for name in names:
        assert f"ok {name}" in out


@pytest.mark.asan
def test_c_ring_address_sanitizer(tmp_path: Path) -> None:
    out = build_and_run(tmp_path, ["-O1", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"], 100_000)
    assert "ERROR: AddressSanitizer" not in out and "runtime error" not in out


@pytest.mark.stress
def test_c_ring_thread_sanitizer(tmp_path: Path) -> None:
    out = build_and_run(tmp_path, ["-O1", "-fsanitize=thread"], 100_000)
    assert "WARNING: ThreadSanitizer" not in out
