"""The fault matrix: peer deaths, fuzzed wire input, thread races and descriptor exhaustion.

Each part has a fast slice in the default suite and a full run behind ``-m stress``
(``./dev stress tests/fault``); both draw from one seed, printed in the session header
and set with ``HYPERPIPE_FAULT_SEED``. The full run ends with the figures that
docs/reliability.md reports.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fault_helpers  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    return f"fault matrix seed: HYPERPIPE_FAULT_SEED={fault_helpers.SEED}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = fault_helpers.latency_table()
    counts = fault_helpers.COUNTS
    if not lines and not counts:
        return
    terminalreporter.section(f"fault matrix (seed {fault_helpers.SEED})")
    for name, value in sorted(counts.items()):
        terminalreporter.write_line(f"{name}: {value}")
    for line in lines:
        terminalreporter.write_line(line)
