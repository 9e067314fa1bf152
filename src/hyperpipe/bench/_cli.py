"""Command line: choose what to run, run it with a progress line, print and save the results."""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, cast

from . import _pool, _report
from ._impls import BASELINE, Impl, all_impls
from ._scenarios import run_pair

GROUPS = {
    "lat": ("lat_bytes", "lat_obj", "lat_asleep"),
    "stream": ("stream", "stream_batch"),
    "large": ("large", "large_zc", "large_zcs"),
    "idle": ("idle",),
}
#: the pipe tests of a run without --only
DEFAULT_ONLY = ",".join(GROUPS)
DEFAULT_SIZES = "1MiB,16MiB,256MiB"
IMPL_ALIASES = {"shm": "hp-shm", "socket": "hp-socket", "pyzmq": "zmq", "faster_fifo": "faster-fifo"}
#: where results go unless --json says otherwise (relative to the current folder)
RESULTS_DIR = "bench-results"

QUICK: dict[str, Any] = dict(rounds=1, lat_iters=3000, lat_warmup=300, asleep_iters=200, stream_msgs=50_000, stream_warmup=2_000,
             reps={1 << 20: 8, 16 << 20: 4, 256 << 20: 3})
FULL: dict[str, Any] = dict(rounds=2, lat_iters=20_000, lat_warmup=2_000, asleep_iters=1_000, stream_msgs=200_000, stream_warmup=5_000,
            reps={1 << 20: 31, 16 << 20: 11, 256 << 20: 6})


def parse_size(text: str) -> int:
    s = text.strip().lower().replace(" ", "")
    for suffix, mult in (("gib", 1 << 30), ("mib", 1 << 20), ("kib", 1 << 10), ("gb", 10**9), ("mb", 10**6),
                         ("kb", 10**3), ("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10), ("b", 1)):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(s)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m hyperpipe.bench",
        description="Measure hyperpipe against multiprocessing.Pipe (always run, as the baseline) in one run: "
        "round-trip latency, streaming, large numpy arrays, idle CPU. Each measurement runs in two fresh "
        "worker processes. Table on stdout, progress on stderr. Also installed as the hyperpipe-bench command.",
        epilog="Exit status: 0 when every measurement ran (missed targets included), 1 when one failed, 2 for bad "
        "arguments. Method and a full run: docs/benchmarks.md in hyperpipe's source.",
    )
    ap.add_argument("--quick", action="store_true", help="small counts: the whole run in under a minute on 2 cores")
    ap.add_argument("--only", default=None,
                    help="comma-separated groups (default: all of them, the pipe tests first, then the pool "
                    "and queue rows): "
                    + "; ".join(f"{group} = {', '.join(tests)}" for group, tests in GROUPS.items())
                    + "; or single tests by those names. pool, queue: the Pool/ProcessPoolExecutor/Queue "
                    "rows (" + ", ".join(_pool.ROWS) + "), asked for on their own or with nothing else")
    impls = all_impls()
    ap.add_argument("--impl", default="all",
                    help="comma-separated implementations: " + "; ".join(f"{i.name} = {i.label}" for i in impls)
                    + "; hp = every hyperpipe row; all (default) = every one installed here. Also accepted: "
                    + ", ".join(f"{alias} for {name}" for alias, name in IMPL_ALIASES.items())
                    + ". mp is always added, and so is what a row is compared with (mp-tcp for hp-tcp, the "
                    "synchronous row for an -async one)")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"array sizes for the large test (default {DEFAULT_SIZES})")
    ap.add_argument("--iters", type=int, help="timed round trips per latency test (default 20000, --quick 3000)")
    ap.add_argument("--msgs", type=int, help="messages per streaming test (default 200000, --quick 50000)")
    ap.add_argument("--reps", type=int, help="repetitions per array size, the first a warm-up (default 31/11/6 for "
                    "1/16/256 MiB, --quick 8/4/3)")
    ap.add_argument("--rounds", type=int, help="how often each latency test runs, in separate worker pairs, "
                    "pooled in the table (default 2, --quick 1); the spread between rounds shows the noise")
    ap.add_argument("--asleep-ms", type=float, default=2.0,
                    help="idle time before each 'asleep' round trip, past any spin window (default 2)")
    ap.add_argument("--batch", type=int, default=64, help="messages per call in the batch stream (default 64)")
    ap.add_argument("--idle-s", type=float, default=1.0, help="how long the idle receiver waits (default 1.0)")
    ap.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default="fork",
                    help="how workers start (default fork: peak RSS by getrusage is only right under fork)")
    ap.add_argument("--pin", choices=("none", "same", "cross"), default="none",
                    help="pin the two workers of every pipe measurement: same = both on the first usable "
                    "CPU, cross = a on the first, b on the second (default none: where the scheduler puts them; "
                    "a blocking round trip differs 2-5x between the two, see docs/benchmarks.md, Method)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds allowed for one measurement (default 120)")
    ap.add_argument("--json", metavar="FILE", default=None,
                    help="where to write every number measured, with the machine and the config (default: "
                    f"{RESULTS_DIR}/hyperpipe-bench-<date>-<time>.json in the current folder)")
    ap.add_argument("--no-json", action="store_true", help="write no results file")
    ap.add_argument("--plot", metavar="FILE.png", help="bar charts of the results (needs matplotlib: pip install "
                    "'hyperpipe[plot]')")
    ap.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    return ap


def pin_plan(ap: argparse.ArgumentParser, pin: str) -> Optional[dict[str, int]]:
    """The CPU of each worker for --pin, from the CPUs this process may use; None: unpinned."""
    if pin == "none":
        return None
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        ap.error("--pin: this system cannot pin processes to CPUs")
    if pin == "cross" and len(cpus) < 2:
        ap.error("--pin cross needs two usable CPUs")
    return {"a": cpus[0], "b": cpus[0] if pin == "same" else cpus[1]}


def select_tests(ap: argparse.ArgumentParser, text: str) -> list[str]:
    chosen: set[str] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part in GROUPS:
            chosen.update(GROUPS[part])
        elif part in _report.TESTS:
            chosen.add(part)
        else:
            ap.error(f"--only: unknown test {part!r} (known: {', '.join(GROUPS)}, {', '.join(_report.TESTS)})")
    if not chosen:
        ap.error("--only selects nothing")
    return [t for t in _report.TESTS if t in chosen]


def select_impls(ap: argparse.ArgumentParser, text: str, known: list[Impl]) -> tuple[list[Impl], set[str]]:
    """The implementations to run (baseline first) and the names asked for explicitly."""
    names = {i.name for i in known}
    if text.strip() == "all":
        return known, set()
    wanted: set[str] = {BASELINE}
    explicit: set[str] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        part = IMPL_ALIASES.get(part, part)
        if part == "hp":
            group = {i.name for i in known if i.is_hyperpipe}
        elif part in names:
            group = {part}
        else:
            ap.error(f"--impl: unknown implementation {part!r} (known: {', '.join(sorted(names))}, hp, all)")
        wanted |= group
        explicit |= group
    # A row is only meaningful beside what it is compared with.
    for impl in known:
        if impl.name in wanted:
            wanted.add(impl.baseline)
            wanted.add(getattr(impl, "sync_name", impl.baseline))
    return [i for i in known if i.name in wanted], explicit


@dataclass
class Step:
    test: str
    impl: Impl
    scenario: str
    params: dict
    size: Optional[int] = None
    round: int = 0
    desc: str = field(default="")


class Progress:
    """A progress bar with rich on a terminal, else one plain line per measurement."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self._rich: Any = None
        if enabled and sys.stderr.isatty() and importlib.util.find_spec("rich") is not None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                                      refresh_per_second=2)  # little CPU taken from the measurement
            self._rich.start()
            self._task = self._rich.add_task("starting", total=total)

    def begin(self, desc: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=desc)

    def end(self, desc: str, outcome: str) -> None:
        self.done += 1
        if self._rich is not None:
            self._rich.update(self._task, advance=1)
            self._rich.console.print(f"{desc}: {outcome}", markup=False, highlight=False)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {desc}: {outcome}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


def summarize(step: Step, run: dict) -> dict:
    """Turn the two workers' raw results into a record with statistics."""
    rec: dict[str, Any] = {"impl": step.impl.name, "test": step.test, "size": step.size, "params": step.params,
                           "wall_s": round(run.get("wall_s", 0.0), 3), "ok": run["ok"]}
    if not run["ok"]:
        rec["error"] = run["error"]
        return rec
    a, b = run["a"], run["b"]
    for who in (a, b):
        if "ok" in who and not who["ok"]:
            rec["ok"], rec["error"] = False, who.get("why") or "data check failed"
            return rec
    rec["placement"] = {"a": a.get("placement"), "b": b.get("placement")}
    if "conn_statistics" in a or "conn_statistics" in b:
        rec["conn_statistics"] = {"a": a.get("conn_statistics"), "b": b.get("conn_statistics")}
    p = step.params
    if step.scenario == "latency":
        rec["stats"] = _report.latency_stats(a["lat_ns"], a["total_ns"])
        rec["_lat_ns"], rec["_total_ns"] = a["lat_ns"], a["total_ns"]  # pooled across rounds, then dropped
    elif step.scenario in ("stream", "stream_batch"):
        rec["stats"] = _report.stream_stats(p["msgs"], a["t0"], a["t_sent"], b["t1"])
    elif step.scenario == "large":
        rec["stats"] = _report.large_stats(p["nbytes"], a, b)
    elif step.scenario == "idle":
        rec["stats"] = _report.idle_stats(b)
    return rec


def pool_rounds(records: list[dict]) -> list[dict]:
    """One record per latency test: every round's samples pooled, each round's p50/p99 kept.

    A test that failed in any round is reported as failed.
    """
    out: list[dict] = []
    by_key: dict[tuple, list[dict]] = {}
    for rec in records:
        if rec["test"].startswith("lat_"):
            key = (rec["impl"], rec["test"])
            if key not in by_key:
                by_key[key] = []
                out.append({"_pool": key})
            by_key[key].append(rec)
        else:
            rec.pop("round", None)
            out.append(rec)
    for i, placeholder in enumerate(out):
        if "_pool" not in placeholder:
            continue
        rounds = by_key[placeholder["_pool"]]
        first = rounds[0]
        merged = {k: v for k, v in first.items()
                  if not k.startswith("_") and k not in ("stats", "round", "conn_statistics", "placement")}
        for per_round in ("conn_statistics", "placement"):
            if any(per_round in r for r in rounds):
                merged[per_round] = [r.get(per_round) for r in rounds]
        merged["wall_s"] = round(sum(r["wall_s"] for r in rounds), 3)
        failed = [r for r in rounds if not r["ok"]]
        if failed:
            merged["ok"], merged["error"] = False, failed[0].get("error")
        else:
            merged["stats"] = _report.latency_stats(b"".join(r["_lat_ns"] for r in rounds),
                                                    sum(r["_total_ns"] for r in rounds))
            merged["rounds"] = [{"p50_us": r["stats"]["p50_us"], "p99_us": r["stats"]["p99_us"]} for r in rounds]
        out[i] = merged
    return out


def outcome_text(rec: dict) -> str:
    if not rec["ok"]:
        lines = (rec.get("error") or "failed").strip().splitlines()
        return "FAILED: " + (lines[-1] if lines else "")
    st = rec["stats"]
    if "p50_us" in st:
        return f"p50 {st['p50_us']:.2f} µs, p99 {st['p99_us']:.2f} µs"
    if "msgs_per_s" in st:
        return f"{st['msgs_per_s']:,.0f} msg/s"
    if "GBps_median" in st:
        return (f"{st['GBps_median']:.2f} GB/s, peak RSS {st['sender']['peak_rss_mib']:.0f} / "
                f"{st['receiver']['peak_rss_mib']:.0f} MiB")
    if "cpu_percent" in st:
        return f"{st['cpu_percent']:.2f}% CPU"
    return "ok"


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    ap = build_parser()
    opts = ap.parse_args(argv)
    started = time.monotonic()
    started_at = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    command = "python -m hyperpipe.bench" + (" " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()

    if opts.only is None:  # the whole benchmark: every pipe test, then every pool and queue row
        pool_rows, only = list(_pool.ROWS), DEFAULT_ONLY
    else:
        pool_rows, only = _pool.split_only(opts.only)
        if pool_rows and only:
            ap.error("--only: the pool and queue rows run on their own (another run for the pipe tests)")
    if opts.json and opts.no_json:
        ap.error("--json and --no-json contradict each other")
    json_path = opts.json
    if json_path is None and not opts.no_json:
        json_path = os.path.join(RESULTS_DIR, f"hyperpipe-bench-{_dt.datetime.now():%Y%m%d-%H%M%S}.json")
    if pool_rows and not only:
        pool = _run_pool_rows(pool_rows, opts)
        if json_path:
            _write_json(json_path, {"schema": "hyperpipe-bench-pool/1", "command": command, **pool})
        return 1 if _pool.failed(pool) else 0
    tests = select_tests(ap, only)
    try:
        sizes = [parse_size(s) for s in opts.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes: cannot read {opts.sizes!r} (example: 1MiB,16MiB,256MiB)")
    for s in sizes:
        if s <= 0 or s % 8:
            ap.error(f"--sizes: {s} bytes is not a positive multiple of 8 (float64 arrays)")
    if not sizes:
        ap.error("--sizes is empty")
    sizes = sorted(set(sizes))
    for name in ("iters", "msgs", "reps", "rounds"):
        v = getattr(opts, name)
        if v is not None and v < 1:
            ap.error(f"--{name} must be at least 1")
    if opts.batch < 1 or opts.idle_s <= 0 or opts.asleep_ms < 0 or opts.timeout <= 0:
        ap.error("--batch, --idle-s and --timeout must be positive, --asleep-ms not negative")
    if opts.plot and importlib.util.find_spec("matplotlib") is None:
        print("--plot needs matplotlib, which is not installed: pip install 'hyperpipe[plot]' (or matplotlib)",
              file=sys.stderr)
        return 2

    for path, what in ((opts.json, "--json"), (opts.plot, "--plot")):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            ap.error(f"{what}: the folder of {path!r} does not exist")
    machine = _report.machine_info(opts.start_method)  # before the run: the load average is the machine's own

    base = QUICK if opts.quick else FULL
    cfg: dict[str, Any] = {
        "quick": opts.quick,
        "tests": tests,
        "lat_iters": opts.iters or base["lat_iters"],
        "lat_rounds": opts.rounds or base["rounds"],
        "lat_warmup": min(base["lat_warmup"], max(10, (opts.iters or base["lat_iters"]) // 10)),
        "asleep_iters": min(base["asleep_iters"], opts.iters or base["asleep_iters"]),
        "asleep_gap_ms": opts.asleep_ms,
        "stream_msgs": opts.msgs or base["stream_msgs"],
        "stream_warmup": min(base["stream_warmup"], max(10, (opts.msgs or base["stream_msgs"]) // 10)),
        "batch": opts.batch,
        "sizes": sizes,
        "large_reps": [opts.reps or base["reps"].get(s) or max(3, min(31, (32 << 20) // s)) for s in sizes],
        "idle_s": opts.idle_s,
        "start_method": opts.start_method,
        "pin": opts.pin,
        "timeout_s": opts.timeout,
    }
    notes: list[str] = []
    pin_cpus = pin_plan(ap, opts.pin)
    if any(t.startswith("large") for t in tests) and importlib.util.find_spec("numpy") is None:
        tests = [t for t in tests if not t.startswith("large")]
        notes.append("large arrays not measured: numpy is not installed (pip install 'hyperpipe[bench]')")

    known = all_impls()
    chosen, explicit = select_impls(ap, opts.impl, known)
    impl_info, active = [], []
    for impl in chosen:
        reason = impl.available()
        features = {"batch": False, "zero_copy": False, "zero_copy_send": False}
        if reason is None:
            try:
                features = impl.features()
            except Exception as exc:
                reason = f"creating a pipe failed: {exc!r}"
        info = {"name": impl.name, "label": impl.label, "is_hyperpipe": impl.is_hyperpipe,
                "available": reason is None, "reason": reason, "version": impl.version() if reason is None else None,
                "features": features, "tests": sorted(impl.tests) if impl.tests is not None else None,
                "baseline": impl.baseline, "kind": impl.kind,
                # an optional peer that is not installed is left out silently unless asked for
                "optional": impl.optional and impl.name not in explicit}
        impl_info.append(info)
        if reason is None:
            active.append((impl, features))
        elif impl.is_hyperpipe or impl.name in explicit:
            notes.append(f"`{impl.name}` not run: {reason}")

    steps: list[Step] = []
    lat_tests = [t for t in tests if t.startswith("lat_")]
    for rnd in range(cfg["lat_rounds"]):  # round 1 of every implementation, then round 2, ...
        for test in lat_tests:
            for impl, _ in active:
                if impl.tests is not None and test not in impl.tests:
                    continue
                if test == "lat_asleep":
                    params = {"iters": cfg["asleep_iters"], "warmup": min(100, cfg["lat_warmup"]),
                              "payload": "bytes", "gap_s": opts.asleep_ms / 1000.0, "max_msg": 4096}
                else:
                    params = {"iters": cfg["lat_iters"], "warmup": cfg["lat_warmup"],
                              "payload": "bytes" if test == "lat_bytes" else "obj", "max_msg": 4096}
                steps.append(Step(test, impl, "latency", params, round=rnd))
    for test in tests:
        for impl, features in active:
            if test.startswith("lat_"):
                continue
            if impl.tests is not None and test not in impl.tests:
                continue
            if test == "stream":
                steps.append(Step(test, impl, "stream", {"msgs": cfg["stream_msgs"], "warmup": cfg["stream_warmup"],
                                                         "max_msg": 100}))
            elif test == "stream_batch" and features["batch"]:
                steps.append(Step(test, impl, "stream_batch", {"msgs": cfg["stream_msgs"],
                                                               "warmup": cfg["stream_warmup"],
                                                               "batch": opts.batch, "max_msg": 100}))
            elif (test == "large" or (test == "large_zc" and features["zero_copy"])
                  or (test == "large_zcs" and features.get("zero_copy_send"))):
                for size, reps in zip(sizes, cfg["large_reps"]):
                    steps.append(Step(test, impl, "large", {"nbytes": size, "reps": reps, "max_msg": size,
                                                            "zero_copy": test != "large",
                                                            "zero_copy_send": test == "large_zcs"}, size))
            elif test == "idle":
                steps.append(Step(test, impl, "idle", {"idle_s": opts.idle_s, "max_msg": 4096}))
    for step in steps:
        step.desc = f"{step.impl.name} {step.test}" + (f" {_report.size_label(step.size)}" if step.size else "")
        if step.scenario == "latency" and cfg["lat_rounds"] > 1:
            step.desc += f" (round {step.round + 1})"

    progress = Progress(len(steps), enabled=not opts.no_progress)
    for n in notes:
        progress.note(n)
    records: list[dict] = []
    interrupted = False
    try:
        for step in steps:
            progress.begin(step.desc)
            run = run_pair(step.impl, step.scenario, step.params, timeout=opts.timeout,
                           start_method=opts.start_method, pin=pin_cpus)
            rec = summarize(step, run)
            rec["round"] = step.round
            records.append(rec)
            progress.end(step.desc, outcome_text(rec))
    except KeyboardInterrupt:  # run_pair has already killed the workers: report what was measured
        interrupted = True
        notes.append(f"interrupted after {len(records)} of {len(steps)} measurements")
    finally:
        progress.close()

    records = pool_rounds(records)
    hp_names = [impl.name for impl, _ in active if impl.is_hyperpipe]
    result = {
        "schema": "hyperpipe-bench/1",
        "started": started_at,
        "duration_s": time.monotonic() - started,
        "command": command,
        "machine": machine,
        "config": cfg,
        "impls": impl_info,
        "records": records,
        "targets": _report.evaluate_targets(records, hp_names, sizes,
                                            {impl.name: impl for impl, _ in active}),
        "notes": notes,
    }
    unicode_ok = (getattr(sys.stdout, "encoding", "") or "").lower().replace("-", "") in ("utf8", "utf16")
    print(_report.render(result, unicode_ok=unicode_ok))
    if pool_rows and not interrupted:
        print()
        result["pool"] = _run_pool_rows(pool_rows, opts)
    if json_path:
        _write_json(json_path, result)
    if opts.plot:
        try:
            _report.plot(result, opts.plot)
            print(f"plot written to {opts.plot}", file=sys.stderr)
        except Exception as exc:
            print(f"--plot failed: {exc!r}", file=sys.stderr)
            return 1
    if interrupted:
        return 130
    return 1 if any(not r["ok"] for r in records) or ("pool" in result and _pool.failed(cast(dict, result["pool"]))) else 0


def _run_pool_rows(rows: list[str], opts: argparse.Namespace) -> dict:
    result = _pool.run(rows, opts.quick, opts.start_method, None if opts.no_progress else _note)
    print(_pool.render(result))
    return result


def _write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"Results (every number, the machine, the config) written to {os.path.abspath(path)}")
