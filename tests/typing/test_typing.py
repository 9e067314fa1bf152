"""mypy passes on typical user code (and on a file importing every public name), and
really checks hyperpipe's types: a file with deliberate mistakes must fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import hyperpipe

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

pytest.importorskip("mypy", reason="mypy is not installed (pip install '.[test]')")


def run_mypy(*paths: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable, "-m", "mypy",
            "--no-error-summary", "--show-error-codes", "--warn-unused-ignores",
            "--cache-dir", str(cache_dir),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=600,
    )


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mypy_cache")


def test_typical_user_code_type_checks(mypy_cache):
    result = run_mypy(HERE / "typical_user_code.py", cache_dir=mypy_cache)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_public_name_is_visible_to_mypy(tmp_path, mypy_cache):
    source = tmp_path / "imports_everything.py"
    source.write_text(
        "".join(f"from hyperpipe import {name}\n" for name in hyperpipe.__all__)
        + "import hyperpipe.connection\n"
        + "".join(
            f"hyperpipe.connection.{name}\n" for name in ("Pipe", "wait", "Listener", "Client")
        )
    )
    result = run_mypy(source, cache_dir=mypy_cache)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_reports_misuse(tmp_path, mypy_cache):
    source = tmp_path / "misuse.py"
    source.write_text(
        "from hyperpipe import Pipe\n"
        "a, b = Pipe()\n"
        "a.send_bytes(12)\n"                # not a buffer
        "n: str = a.recv_bytes()\n"         # returns bytes
        "a.recv(0.5)\n"                     # timeout is keyword-only
        "a.poll('soon')\n"                  # not a number
    )
    result = run_mypy(source, cache_dir=mypy_cache)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert sorted({int(line.split(":")[1]) for line in lines}) == [3, 4, 5, 6], result.stdout
