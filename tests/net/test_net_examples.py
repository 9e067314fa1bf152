"""The two-machines example, both sides run as subprocesses on 127.0.0.1."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from net_support import STEP_TIMEOUT

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_two_machines_example(tls: bool, request: pytest.FixtureRequest) -> None:
    tls_args: list[str] = []
    if tls:
        pki: Any = request.getfixturevalue("pki")
        tls_args = ["--tls-dir", str(pki.directory)]
    env = dict(os.environ, HYPERPIPE_AUTHKEY="example secret", PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "two_machines_server.py"), "--host", "127.0.0.1",
         "--port", "0", "--max-clients", "1", *tls_args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        first = server.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith("listening on "), server.stderr.read()  # type: ignore[union-attr]
        host, port = ast.literal_eval(first.split("listening on ", 1)[1].split(" (TLS")[0])
        client = subprocess.run(
            [sys.executable, str(EXAMPLES / "two_machines_client.py"), "--host", host,
             "--port", str(port), *tls_args],
            capture_output=True, text=True, env=env, timeout=STEP_TIMEOUT,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.splitlines() == ["add(1, 2) = 3", "add(10, 20, 30) = 60",
                                              "add(0.5, 0.25) = 0.75", "bye"]
        out, err = server.communicate(timeout=STEP_TIMEOUT)
        assert server.returncode == 0, err
        assert "client from ('127.0.0.1'" in out
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
