"""The benchmark command runs, prints its table, writes sane JSON and never hangs.

These tests check shape and behaviour only; speed targets live in the benchmark itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from hyperpipe.bench import _report, _scenarios
from hyperpipe.bench._impls import MpPipe, all_impls

HAVE_NUMPY = importlib.util.find_spec("numpy") is not None
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
CLI_TIMEOUT = 180  # a watchdog only: the runs below take seconds


def run_cli(*args: str, prelude: str = "", cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    code = prelude + "import sys; from hyperpipe.bench.__main__ import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONIOENCODING="utf-8", COLUMNS="1000")  # --help unwrapped
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, env=env, cwd=cwd)


def records_of(data: dict, impl: str, test: str) -> list[dict]:
    return [r for r in data["records"] if r["impl"] == impl and r["test"] == test]


def test_quick_latency_table_and_json(tmp_path):
    out = tmp_path / "lat.json"
    proc = run_cli("--quick", "--only", "lat", "--iters", "200", "--asleep-ms", "0.5", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "## Round-trip latency" in proc.stdout
    assert "| `mp` |" in proc.stdout
    assert "Machine: CPU" in proc.stdout and "start method fork" in proc.stdout
    assert "[1/" in proc.stderr  # plain progress lines when stderr is not a terminal
    assert "issue" not in proc.stdout.lower()  # it speaks to users, not to the tracker
    data = json.loads(out.read_text())
    assert data["schema"] == "hyperpipe-bench/1"
    assert data["config"]["lat_iters"] == 200
    for key in ("cpu_model", "cpus", "python", "kernel", "start_method"):
        assert data["machine"][key]
    ran = [i["name"] for i in data["impls"] if i["available"]]
    assert ran[0] == "mp"
    infos = {i["name"]: i for i in data["impls"]}
    assert {"hp-tcp", "mp-tcp"} <= set(ran) or "hp-tcp" not in ran
    for impl in ran:
        runs = infos[impl]["tests"]
        for test in ("lat_bytes", "lat_obj", "lat_asleep"):
            if runs is not None and test not in runs:
                assert records_of(data, impl, test) == []
                continue
            (rec,) = records_of(data, impl, test)
            assert rec["ok"], rec.get("error")
            st = rec["stats"]
            assert st["n"] == 200
            assert 0 < st["min_us"] <= st["p50_us"] <= st["p99_us"] <= st["max_us"]
            assert st["round_trips_per_s"] > 0
        if impl != "mp":
            assert f"| `{impl}` |" in proc.stdout
    for t in data["targets"]:
        assert t["impl"] in ran and isinstance(t["passed"], bool) and t["measured"] > 0
        # each target judges only its kind of row
        if t["impl"] == "hp-socket":
            assert "no worse than mp" in t["target"], t
        prefix = {"tcp": "tcp_", "async": "async_"}.get(infos[t["impl"]]["kind"])
        assert t["id"].startswith(prefix) if prefix else not t["id"].startswith(("tcp_", "async_"))


@pytest.mark.parametrize("pin", ["same", "cross"])
def test_pinned_workers_stay_where_they_were_put(pin, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    if pin == "cross" and len(cpus) < 2:
        pytest.skip("needs two usable CPUs")
    out = tmp_path / "pinned.json"
    proc = run_cli("--quick", "--only", "lat_bytes,lat_obj", "--impl", "hp-socket", "--iters", "200",
                   "--pin", pin, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"Workers pinned** (`--pin {pin}`)" in proc.stdout
    data = json.loads(out.read_text())
    assert data["config"]["pin"] == pin
    want = {"a": cpus[0], "b": cpus[0] if pin == "same" else cpus[1]}
    for rec in data["records"]:
        assert rec["ok"], rec.get("error")
        for placement in rec["placement"]:
            for role in ("a", "b"):
                assert placement[role]["before"]["cpu"] == placement[role]["after"]["cpu"] == want[role]


def test_unpinned_is_the_default(tmp_path):
    out = tmp_path / "free.json"
    proc = run_cli("--quick", "--only", "lat_bytes", "--impl", "mp", "--iters", "100", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Workers pinned" not in proc.stdout
    assert json.loads(out.read_text())["config"]["pin"] == "none"


def test_stream_large_idle_shapes(tmp_path):
    out = tmp_path / "all.json"
    proc = run_cli("--quick", "--only", "stream,large,idle", "--impl", "mp,shm,socket", "--msgs", "3000",
                   "--sizes", "64KiB,1MiB", "--reps", "2", "--idle-s", "0.2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    ran = [i["name"] for i in data["impls"] if i["available"]]
    assert set(ran) <= {"mp", "hp-shm", "hp-socket"} and "mp" in ran
    assert "## Streaming 100-byte messages" in proc.stdout and "## Idle receiver" in proc.stdout
    for impl in ran:
        (stream,) = records_of(data, impl, "stream")
        assert stream["ok"], stream.get("error")
        assert stream["stats"]["msgs_per_s"] > 0
        (idle,) = records_of(data, impl, "idle")
        assert idle["ok"], idle.get("error")
        assert idle["stats"]["wall_s"] >= 0.15 and idle["stats"]["cpu_percent"] >= 0
        if HAVE_NUMPY:
            larges = records_of(data, impl, "large")
            assert sorted(r["size"] for r in larges) == [64 << 10, 1 << 20]
            for rec in larges:
                assert rec["ok"], rec.get("error")
                assert rec["stats"]["GBps_median"] > 0 and len(rec["stats"]["GBps_all"]) == 2
                assert rec["stats"]["sender"]["peak_rss_mib"] > 0 and rec["stats"]["receiver"]["peak_rss_mib"] > 0
    if HAVE_NUMPY:
        assert "## Large float64 arrays" in proc.stdout
    for impl in ran:  # a batch row exactly where the connection has the batch API
        info = next(i for i in data["impls"] if i["name"] == impl)
        assert bool(records_of(data, impl, "stream_batch")) == info["features"]["batch"]
        for rec in records_of(data, impl, "stream_batch"):
            assert rec["ok"] and rec["stats"]["msgs_per_s"] > 0


def test_help_names_every_implementation_and_test():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for impl in all_impls():
        assert f"{impl.name} = " in text, impl.name
    for name in ("hp = ", "all (default)", *_report.TESTS):
        assert name in text, name


def test_results_go_to_a_file_by_default(tmp_path):
    proc = run_cli("--only", "idle", "--impl", "mp", "--idle-s", "0.1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (written,) = (tmp_path / "bench-results").glob("hyperpipe-bench-*.json")
    assert f"written to {written}" in proc.stdout
    data = json.loads(written.read_text())
    assert [r["test"] for r in data["records"]] == ["idle"]
    proc = run_cli("--only", "idle", "--impl", "mp", "--idle-s", "0.1", "--no-json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "bench-results").iterdir())) == 1 and "written to" not in proc.stdout


@pytest.mark.parametrize("args, complaint", [
    (["--impl", "nope"], "unknown implementation 'nope'"),
    (["--only", "bogus"], "unknown test 'bogus'"),
    (["--sizes", "7"], "not a positive multiple of 8"),
    (["--sizes", "lots"], "cannot read"),
    (["--iters", "0"], "--iters must be at least 1"),
    (["--json", "/nonexistent-folder/x.json"], "does not exist"),
    (["--json", "x.json", "--no-json"], "contradict"),
])
def test_bad_arguments_are_refused(args, complaint, tmp_path):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert complaint in proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no results folder for a run that never started


def test_missing_numpy_skips_large_with_a_message(tmp_path):
    proc = run_cli("--quick", "--only", "large,idle", "--impl", "mp", "--idle-s", "0.1",
                   prelude="import sys; sys.modules['numpy'] = None; ", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "large arrays not measured: numpy is not installed" in proc.stdout
    assert "## Large float64 arrays" not in proc.stdout
    assert "## Idle receiver" in proc.stdout


def test_missing_matplotlib_gives_a_clear_message(tmp_path):
    png = tmp_path / "x.png"
    proc = run_cli("--only", "idle", "--impl", "mp", "--plot", str(png),
                   prelude="import sys; sys.modules['matplotlib'] = None; ")
    assert proc.returncode == 2
    assert "--plot needs matplotlib" in proc.stderr
    assert not png.exists()


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed")
def test_plot_writes_a_png(tmp_path):
    png = tmp_path / "bench.png"
    proc = run_cli("--quick", "--only", "lat,idle", "--impl", "mp", "--iters", "100", "--asleep-ms", "0.2",
                   "--idle-s", "0.1", "--plot", str(png), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- a failing or hanging measurement becomes a failed row, never a hang ---------------------


def _raises_in_b(impl, conn, role, p, barrier):
    if role == "b":
        raise RuntimeError("deliberate failure in the receiver")
    conn.recv_bytes()  # would wait forever: the orchestrator must stop this worker
    return {}


def _hangs(impl, conn, role, p, barrier):
    time.sleep(3600)
    return {}


def _dies(impl, conn, role, p, barrier):
    if role == "b":
        os._exit(7)
    return {}


@pytest.fixture
def test_scenarios(monkeypatch):
    monkeypatch.setitem(_scenarios.SCENARIOS, "raises", _raises_in_b)
    monkeypatch.setitem(_scenarios.SCENARIOS, "hangs", _hangs)
    monkeypatch.setitem(_scenarios.SCENARIOS, "dies", _dies)


def _assert_workers_gone():
    import multiprocessing

    assert not [p for p in multiprocessing.active_children() if p.name.startswith("hyperpipe-bench-")]


def test_worker_error_is_reported(test_scenarios):
    t0 = time.monotonic()
    run = _scenarios.run_pair(MpPipe(), "raises", {"max_msg": 64}, timeout=30)
    assert not run["ok"]
    assert "deliberate failure in the receiver" in run["error"]
    assert time.monotonic() - t0 < 25  # it did not wait for the timeout
    _assert_workers_gone()


def test_hung_measurement_times_out_and_is_killed(test_scenarios):
    run = _scenarios.run_pair(MpPipe(), "hangs", {"max_msg": 64}, timeout=2)
    assert not run["ok"]
    assert "timed out after 2 s" in run["error"]
    _assert_workers_gone()


def test_dead_worker_is_reported(test_scenarios):
    run = _scenarios.run_pair(MpPipe(), "dies", {"max_msg": 64}, timeout=30)
    assert not run["ok"]
    assert "exited with code 7" in run["error"]
    _assert_workers_gone()


# -- statistics and targets --------------------------------------------------------------


def test_percentile_matches_linear_interpolation():
    data = [1.0, 2.0, 3.0, 4.0]
    assert _report.percentile(data, 0) == 1.0
    assert _report.percentile(data, 50) == 2.5
    assert _report.percentile(data, 100) == 4.0
    assert _report.percentile([5.0], 99) == 5.0


def _lat(impl, test, p50, p99):
    return {"impl": impl, "test": test, "size": None, "ok": True, "stats": {"p50_us": p50, "p99_us": p99}}


def test_ratios_and_targets_go_the_right_way():
    records = [
        _lat("mp", "lat_bytes", 30.0, 40.0),
        _lat("hp-shm", "lat_bytes", 2.0, 10.0),  # 15x faster, but p99 is 5x p50
        {"impl": "mp", "test": "stream", "size": None, "ok": True, "stats": {"msgs_per_s": 300_000.0}},
        {"impl": "hp-shm", "test": "stream", "size": None, "ok": True, "stats": {"msgs_per_s": 1_200_000.0}},
        {"impl": "hp-shm", "test": "idle", "size": None, "ok": False, "error": "boom"},
    ]
    assert _report.ratio(records, "hp-shm", "lat_bytes") == pytest.approx(15.0)
    assert _report.ratio(records, "hp-shm", "stream") == pytest.approx(4.0)
    verdicts = {t["id"]: t["passed"] for t in _report.evaluate_targets(records, ["hp-shm"], [1 << 20])}
    assert verdicts["rt64"] is True and verdicts["rt64_x"] is True
    assert verdicts["rt64_tail"] is False
    assert verdicts["stream"] is False and verdicts["stream_x"] is False
    assert "idle" not in verdicts and "rtobj" not in verdicts  # failed or not measured: no verdict


def test_the_socket_transport_is_held_to_multiprocessing_not_to_shared_memory():
    records = [
        _lat("mp", "lat_bytes", 50.0, 70.0),
        _lat("hp-shm", "lat_bytes", 1.0, 1.2),
        _lat("hp-socket", "lat_bytes", 45.0, 60.0),  # 1.11x mp: far from the shared-memory goals
    ]
    targets = _report.evaluate_targets(records, ["hp-shm", "hp-socket"], [1 << 20])
    socket = {t["id"]: t for t in targets if t["impl"] == "hp-socket"}
    shm = {t["id"]: t for t in targets if t["impl"] == "hp-shm"}
    assert set(socket) == {"rt64_x"} and socket["rt64_x"]["passed"] is True
    assert "no worse than mp" in socket["rt64_x"]["target"]
    assert {"rt64", "rt64_x", "rt64_tail"} <= set(shm) and shm["rt64_x"]["target"] == "RT 64 B ≥ 8x mp"
    records[2] = _lat("hp-socket", "lat_bytes", 60.0, 80.0)  # slower than mp: missed
    targets = _report.evaluate_targets(records, ["hp-socket"], [1 << 20])
    assert [(t["id"], t["passed"]) for t in targets] == [("rt64_x", False)]


def test_render_marks_failures_and_targets():
    records = [
        _lat("mp", "lat_bytes", 30.0, 40.0),
        {"impl": "hp-shm", "test": "lat_bytes", "size": None, "ok": False, "error": "Traceback...\nOSError: broken"},
    ]
    result = {
        "records": records,
        "impls": [{"name": "mp", "label": "mp", "available": True, "is_hyperpipe": False},
                  {"name": "hp-shm", "label": "shm", "available": True, "is_hyperpipe": True}],
        "targets": _report.evaluate_targets(records, ["hp-shm"], [1 << 20]),
        "machine": _report.machine_info("fork"),
        "config": {"sizes": [1 << 20], "quick": True, "lat_iters": 10, "lat_warmup": 1, "asleep_iters": 10,
                   "asleep_gap_ms": 1.0},
        "started": "now", "command": "python -m hyperpipe.bench", "duration_s": 1.0, "notes": [],
    }
    text = _report.render(result, unicode_ok=False)
    assert "| `hp-shm` | FAILED |" in text
    assert "- `hp-shm` lat_bytes: OSError: broken" in text
