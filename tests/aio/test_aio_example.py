"""The asyncio example runs standalone and does what it prints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "examples",
    "async_server_workers.py",
)


@pytest.mark.parametrize("transport", ["socket", "auto"])
def test_async_server_workers_example(transport):
    env = dict(os.environ, HYPERPIPE_TRANSPORT=transport)
    result = subprocess.run(
        [sys.executable, EXAMPLE], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "200 jobs answered for 8 clients" in result.stdout
    assert "every job answered exactly once" in result.stdout
