"""The Pool / Queue benchmark rows: selection and the table (numbers made up here; the
real ones come from ``hyperpipe-bench --only pool,queue``)."""

from __future__ import annotations

import json

from hyperpipe.bench import _cli, _pool


def test_only_splits_pool_rows_from_the_pipe_tests():
    rows, rest = _pool.split_only("lat,pool,queue_rtt,stream")
    assert rows == ["pool_map_tiny", "executor_map_tiny", "pool_map_arrays", "queue_rtt"]
    assert rest == "lat,stream"
    assert _pool.split_only("queue") == (list(_pool.GROUPS["queue"]), "")


def test_render_gives_ratios_and_verdicts():
    result = {"config": dict(_pool.QUICK), "method": "fork", "load": (1.0, 1.0, 1.0),
              "rows": {"queue_rtt": {"mp": 80.0, "hp": 5.0, "faster-fifo": 40.0},
                       "pool_map_tiny": {"mp": 100.0, "hp": 150.0},
                       "queue_1to1": {"mp": 10.0, "hp": "failed: OSError()"}}}
    table = _pool.render(result)
    assert "16.00x >=10x met" in table  # latency: lower is better
    assert "1.50x >=3x MISSED" in table
    assert "2.00x" in table  # faster-fifo's ratio, no verdict
    assert "failed: OSError()" in table


def test_a_queue_row_runs_and_writes_its_results(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cli.main(["--only", "queue_rtt", "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "queue_rtt" in out and " mp " in out and " hp " in out
    (written,) = (tmp_path / _cli.RESULTS_DIR).iterdir()  # like every run without --no-json
    saved = json.loads(written.read_text())
    assert saved["schema"] == "hyperpipe-bench-pool/1"
    assert set(saved["rows"]["queue_rtt"]) >= {"mp", "hp"}


def test_pool_rows_and_pipe_tests_are_not_mixed(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        _cli.main(["--only", "lat,pool"])
    assert exc.value.code == 2
    assert "on their own" in capsys.readouterr().err


def test_a_run_without_only_ends_with_every_pool_and_queue_row(capsys, tmp_path, monkeypatch):
    asked = []

    def fake_run(rows, quick, method, progress=None):
        asked.append(rows)
        return {"config": _pool.QUICK, "method": method, "load": (0.0, 0.0, 0.0),
                "rows": {row: {"mp": 1.0, "hp": 2.0} for row in rows}}

    monkeypatch.setattr(_pool, "run", fake_run)
    monkeypatch.setattr(_cli, "DEFAULT_ONLY", "idle")  # the pipe part kept short
    out_file = tmp_path / "run.json"
    assert _cli.main(["--quick", "--impl", "mp", "--idle-s", "0.1", "--no-progress", "--json", str(out_file)]) == 0
    assert asked == [list(_pool.ROWS)]
    out = capsys.readouterr().out
    assert out.index("idle") < out.index("queue_rtt")  # the pipe table first, then the pool rows
    saved = json.loads(out_file.read_text())
    assert set(saved["pool"]["rows"]) == set(_pool.ROWS) and saved["records"]
