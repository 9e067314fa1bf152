"""The pool group's extra impls: ``install()`` around an unchanged program, verdicts for it."""

from __future__ import annotations

import multiprocessing.connection

import pytest

import hyperpipe
import hyperpipe._context
from hyperpipe.bench import _pool


def test_installed_runs_the_program_under_install_and_undoes_it():
    seen = []

    def program(ctx, cfg):
        seen.append((ctx.get_start_method(), hyperpipe._context.installed()))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        _pool._installed(program, "fork", {})
    assert seen == [("fork", True)]
    assert not hyperpipe._context.installed()
    assert multiprocessing.connection.Pipe is hyperpipe._context._stdlib_pipe


def test_render_gives_install_its_verdict():
    result = {"config": dict(_pool.QUICK), "method": "fork", "load": (1.0, 1.0, 1.0),
              "rows": {"executor_map_tiny": {"mp": 100.0, "hp": 310.0, "hp-install": 290.0, "loky": 120.0}}}
    table = _pool.render(result)
    assert "3.10x >=3x met" in table and "2.90x >=3x MISSED" in table
    assert "1.20x" in table and "1.20x >=" not in table  # a peer: a ratio, no verdict
