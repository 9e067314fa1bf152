"""The Pool / Queue benchmark rows: selection and the table (numbers made up here; the
real ones come from ``hyperpipe-bench --only pool,queue``)."""

from __future__ import annotations

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


def test_a_queue_row_runs(capsys):
    assert _cli.main(["--only", "queue_rtt", "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "queue_rtt" in out and " mp " in out and " hp " in out


def test_pool_rows_and_pipe_tests_are_not_mixed(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        _cli.main(["--only", "lat,pool"])
    assert exc.value.code == 2
    assert "on their own" in capsys.readouterr().err
