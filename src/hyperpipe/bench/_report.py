"""Statistics, targets, the table on stdout, the JSON file and the optional plot.

Everything here works on plain records (dicts), so it needs neither numpy nor a worker.
A record is ``{"impl", "test", "size", "ok", "error", "stats"}``; ``test`` is one of
``TESTS``; ``size`` is the array size in bytes for the large tests, else None.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import sys
from array import array
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional

from ._impls import BASELINE, all_impls, baseline_of

MiB = 1 << 20
#: the size the RSS and ratio targets are stated for
RSS_TARGET_SIZE = 256 * MiB

TESTS = ("lat_bytes", "lat_obj", "lat_asleep", "stream", "stream_batch", "large", "large_zc", "large_zcs", "idle")
LOWER_IS_BETTER = {"lat_bytes", "lat_obj", "lat_asleep", "idle"}


# -- statistics ------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on sorted data."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    return percentile(sorted(values), 50)


def latency_stats(lat_ns: bytes, total_ns: int) -> dict:
    samples = array("q")
    samples.frombytes(lat_ns)
    us = sorted(v / 1000.0 for v in samples)
    out = {f"p{str(q).replace('.', '_')}_us": percentile(us, q) for q in (1, 10, 50, 90, 99, 99.9)}
    out.update(
        n=len(us),
        min_us=us[0],
        max_us=us[-1],
        mean_us=sum(us) / len(us),
        round_trips_per_s=len(us) / (total_ns / 1e9),
    )
    return out


def stream_stats(msgs: int, t0: int, t_sent: int, t1: int) -> dict:
    seconds = (t1 - t0) / 1e9
    return {"msgs_per_s": msgs / seconds, "seconds": seconds, "sender_seconds": (t_sent - t0) / 1e9}


def _rss(worker: dict) -> dict:
    rss = worker["rss"]
    return {
        "peak_rss_mib": rss["end"]["maxrss_kib"] / 1024,
        "vmhwm_mib": (rss["end"]["vmhwm_kib"] or 0) / 1024,
        "start_rss_mib": rss["start"]["maxrss_kib"] / 1024,
    }


def large_stats(nbytes: int, a: dict, b: dict) -> dict:
    seconds = [(t1 - t0) / 1e9 for t0, t1 in zip(a["t0"], b["t1"])]
    gbps = [nbytes / s / 1e9 for s in seconds]
    timed = gbps[1:] if len(gbps) > 1 else gbps  # the first repetition is the warm-up
    return {
        "GBps_median": median(timed),
        "GBps_best": max(timed),
        "GBps_first_rep": gbps[0],
        "GBps_all": gbps,
        "sender": _rss(a),
        "receiver": _rss(b),
    }


def idle_stats(b: dict) -> dict:
    return {"cpu_percent": 100.0 * b["cpu_s"] / b["wall_s"], "cpu_s": b["cpu_s"], "wall_s": b["wall_s"]}


# -- lookups ---------------------------------------------------------------------------


def find(records: list[dict], impl: str, test: str, size: Optional[int] = None) -> Optional[dict]:
    for rec in records:
        if rec["impl"] == impl and rec["test"] == test and rec.get("size") == size:
            return rec
    return None


def value(records: list[dict], impl: str, test: str, key: str, size: Optional[int] = None) -> Optional[float]:
    rec = find(records, impl, test, size)
    if rec is None or not rec["ok"]:
        return None
    return rec["stats"].get(key)


HEADLINE_KEY = {
    "lat_bytes": "p50_us",
    "lat_obj": "p50_us",
    "lat_asleep": "p50_us",
    "stream": "msgs_per_s",
    "stream_batch": "msgs_per_s",
    "large": "GBps_median",
    "large_zc": "GBps_median",
    "large_zcs": "GBps_median",
    "idle": "cpu_percent",
}


def ratio(records: list[dict], impl: str, test: str, size: Optional[int] = None) -> Optional[float]:
    """How many times better than the baseline: mp/this for latency, this/mp for throughput.

    The zero-copy and batch rows compare with the baseline's ordinary ``large`` and
    ``stream`` rows (``multiprocessing`` has neither).
    """
    key = HEADLINE_KEY[test]
    mine = value(records, impl, test, key, size)
    base = value(records, baseline_of(impl), {"large_zc": "large", "large_zcs": "large", "stream_batch": "stream"}.get(test, test), key,
                 size)
    if mine is None or base is None or mine <= 0 or base <= 0:
        return None
    return base / mine if test in LOWER_IS_BETTER else mine / base


# -- targets ---------------------------------------------------------------------------


@dataclass
class Target:
    id: str
    text: str  # the goal as a reader sees it
    measure: Callable[[list[dict], str], Optional[float]]  # (records, impl) -> number
    fmt: Callable[[float], str]
    ok: Callable[[float], bool]
    kind: str = "shm"  # which rows it judges: "shm", "socket", "tcp" or "async" (see target_kind)


def _us(v: float) -> str:
    return f"{v:.2f} µs" if v < 10 else f"{v:.1f} µs"


def _x(v: float) -> str:
    if v < 10:  # two decimals, so that 4.98x (a miss of ≥ 5x) never shows as 5.0x
        return f"{v:.2f}x"
    return f"{v:.1f}x" if v < 100 else f"{v:.0f}x"


def _tail(test: str) -> Callable[[list[dict], str], Optional[float]]:
    def measure(records: list[dict], impl: str) -> Optional[float]:
        p50, p99 = value(records, impl, test, "p50_us"), value(records, impl, test, "p99_us")
        return p99 / p50 if p50 and p99 else None

    return measure


def _rss_ratio(side: str) -> Callable[[list[dict], str], Optional[float]]:
    def measure(records: list[dict], impl: str) -> Optional[float]:
        rec = find(records, impl, "large", RSS_TARGET_SIZE)
        if rec is None or not rec["ok"]:
            return None
        return rec["stats"][side]["peak_rss_mib"] * MiB / RSS_TARGET_SIZE

    return measure


def _batch_gain(records: list[dict], impl: str) -> Optional[float]:
    batch, single = value(records, impl, "stream_batch", "msgs_per_s"), value(records, impl, "stream", "msgs_per_s")
    return batch / single if batch and single else None


def _gbps(test: str, size: int) -> Callable[[list[dict], str], Optional[float]]:
    return lambda records, impl: value(records, impl, test, "GBps_median", size)


def _gb(v: float) -> str:
    return f"{v:.2f} GB/s"


def size_label(nbytes: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if nbytes >= div and nbytes % div == 0:
            return f"{nbytes // div} {unit}"
    return f"{nbytes} B"


def _no_worse_than_baseline(test: str, size: Optional[int] = None) -> Callable[[list[dict], str], Optional[float]]:
    return lambda records, impl: ratio(records, impl, test, size)


def _at_least(limit: float) -> Callable[[float], bool]:
    return lambda v: v >= limit


def targets_for(sizes: list[int]) -> list[Target]:
    """The goals per kind of row. Ids are per kind: ``rt64_x`` of a shared-memory row and of a
    socket row mark the same table cell with different goals."""
    ts = [
        Target("rt64", "RT 64 B p50 ≤ 3 µs", lambda r, i: value(r, i, "lat_bytes", "p50_us"), _us, lambda v: v <= 3.0),
        Target("rt64_x", "RT 64 B ≥ 8x mp", _no_worse_than_baseline("lat_bytes"), _x, _at_least(8.0)),
        Target("rt64_tail", "RT 64 B p99 ≤ 3x p50", _tail("lat_bytes"), _x, lambda v: v <= 3.0),
        Target("rtobj", "RT tuple p50 ≤ 5 µs", lambda r, i: value(r, i, "lat_obj", "p50_us"), _us, lambda v: v <= 5.0),
        Target("rtobj_tail", "RT tuple p99 ≤ 3x p50", _tail("lat_obj"), _x, lambda v: v <= 3.0),
        Target("asleep_x", "RT asleep no worse than mp (≥ 1.0x)", _no_worse_than_baseline("lat_asleep"), _x,
               _at_least(1.0)),
        Target("stream", "stream ≥ 1.5 M msg/s", lambda r, i: value(r, i, "stream", "msgs_per_s"),
               lambda v: f"{v / 1e6:.2f} M/s", lambda v: v >= 1.5e6),
        Target("stream_x", "stream ≥ 5x mp", _no_worse_than_baseline("stream"), _x, _at_least(5.0)),
        Target("batch_gain", "batch stream > per-message", _batch_gain, _x, lambda v: v > 1.0),
    ]
    for size in sizes:
        ts.append(Target(f"large_{size}", f"{size_label(size)} ≥ 8 GB/s", _gbps("large", size), _gb,
                         lambda v: v >= 8.0))
    if RSS_TARGET_SIZE in sizes:
        ts.append(Target("large_x", "256 MiB ≥ 35x mp", _no_worse_than_baseline("large", RSS_TARGET_SIZE), _x,
                         _at_least(35.0)))
    for size in sizes:
        ts.append(Target(f"zc_{size}", f"{size_label(size)} copy=False ≥ 15 GB/s", _gbps("large_zc", size), _gb,
                         lambda v: v >= 15.0))
    if RSS_TARGET_SIZE in sizes:
        ts.append(Target("rss_recv", "256 MiB peak RSS receiver ≤ 1.2x payload", _rss_ratio("receiver"), _x,
                         lambda v: v <= 1.2))
        ts.append(Target("rss_send", "256 MiB peak RSS sender ≤ 2.2x payload", _rss_ratio("sender"), _x,
                         lambda v: v <= 2.2))
    idle = Target("idle", "idle receiver < 1% CPU", lambda r, i: value(r, i, "idle", "cpu_percent"),
                  lambda v: f"{v:.2f}%", lambda v: v < 1.0)
    ts.append(idle)
    # The socket transport is the portable fallback, the standard library's own mechanism:
    # it is held to multiprocessing's speed, not to shared memory's.
    ts += [
        Target("rt64_x", "RT 64 B no worse than mp (≥ 1.0x)", _no_worse_than_baseline("lat_bytes"), _x,
               _at_least(1.0), kind="socket"),
        Target("asleep_x", "RT asleep no worse than mp (≥ 1.0x)", _no_worse_than_baseline("lat_asleep"), _x,
               _at_least(1.0), kind="socket"),
        Target("stream_x", "stream no worse than mp (≥ 1.0x)", _no_worse_than_baseline("stream"), _x,
               _at_least(1.0), kind="socket"),
    ]
    if RSS_TARGET_SIZE in sizes:
        ts.append(Target("large_x", "256 MiB no worse than mp (≥ 1.0x)",
                         _no_worse_than_baseline("large", RSS_TARGET_SIZE), _x, _at_least(1.0), kind="socket"))
    ts.append(replace(idle, kind="socket"))
    # The TCP Listener/Client against the standard library's, same run.
    ts.append(Target("tcp_rt_x", "TCP RT 64 B no worse than stdlib (≥ 1.0x mp-tcp)",
                     _no_worse_than_baseline("lat_bytes"), _x, _at_least(1.0), kind="tcp"))
    if RSS_TARGET_SIZE in sizes:
        ts.append(Target("tcp_large_x", "TCP 256 MiB no worse than stdlib (≥ 1.0x mp-tcp)",
                         _no_worse_than_baseline("large", RSS_TARGET_SIZE), _x, _at_least(1.0), kind="tcp"))
    # Awaiting costs little next to the synchronous path of the same transport.
    ts.append(Target("async_rt", "async RT 64 B ≤ 2x sync RT", _vs_sync("lat_bytes", "p50_us"), _x,
                     lambda v: v <= 2.0, kind="async"))
    for size in sizes:
        ts.append(Target(f"async_large_{size}", f"async {size_label(size)} ≥ 0.9x sync GB/s",
                         _vs_sync("large", "GBps_median", size), _x, lambda v: v >= 0.9, kind="async"))
    return ts


def _vs_sync(test: str, key: str, size: Optional[int] = None) -> Callable[[list[dict], str], Optional[float]]:
    """This async row's number divided by the synchronous row of the same transport."""

    def measure(records: list[dict], impl: str) -> Optional[float]:
        mine = value(records, impl, test, key, size)
        sync = value(records, impl.removesuffix("-async"), test, key, size)
        return mine / sync if mine and sync else None

    return measure


def target_kind(impl: Any) -> str:
    """Which targets judge this implementation: a pipe's are its transport's."""
    return impl.transport if impl.kind == "pipe" else impl.kind


def evaluate_targets(records: list[dict], impls: list[str], sizes: list[int],
                     known: Optional[dict] = None) -> list[dict]:
    """One entry per (target, hyperpipe implementation) that was measured and it applies to."""
    known = known or {impl.name: impl for impl in all_impls()}
    out = []
    for target in targets_for(sizes):
        for impl in impls:
            if impl not in known or target_kind(known[impl]) != target.kind:
                continue
            measured = target.measure(records, impl)
            if measured is None:
                continue
            out.append({
                "id": target.id,
                "target": target.text,
                "impl": impl,
                "measured": measured,
                "shown": target.fmt(measured),
                "passed": bool(target.ok(measured)),
            })
    return out


# -- machine facts ---------------------------------------------------------------------


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(start_method: str) -> dict:
    info: dict[str, Any] = {
        "cpu_model": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "numpy": _dist_version("numpy"),
        "hyperpipe": _dist_version("hyperpipe"),
        "start_method": start_method,
    }
    try:
        import hyperpipe

        info["hyperpipe_info"] = hyperpipe.info()
    except Exception as exc:  # an old or broken checkout: still benchmark the rest
        info["hyperpipe_info"] = {"error": repr(exc)}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def _hp_details(hp: dict) -> str:
    if "available_transports" not in hp:
        return ""
    core = str(hp.get("core", "?"))
    return f" (C core {core.split(' (')[0]}, transports {', '.join(hp['available_transports'])})"


def machine_line(m: dict) -> str:
    parts = [
        f"CPU {m.get('cpu_model')} ({m.get('cpus')} cores)",
        f"{m.get('mem_total_gib', '?')} GiB",
        f"Linux {m.get('kernel')}" if sys.platform.startswith("linux") else m.get("platform", ""),
        f"{m.get('python_impl')} {m.get('python')}",
        f"numpy {m.get('numpy') or 'missing'}",
        f"hyperpipe {m.get('hyperpipe') or 'missing'}" + _hp_details(m.get("hyperpipe_info") or {}),
        f"start method {m.get('start_method')}",
    ]
    load = m.get("loadavg_at_start")
    if load:
        parts.append(f"load avg {load[0]:.2f}")
    return "; ".join(parts)


# -- the table -------------------------------------------------------------------------


class Marks:
    def __init__(self, unicode_ok: bool):
        self.yes, self.no = ("✓", "✗") if unicode_ok else ("+", "-")

    def __call__(self, passed: Optional[bool]) -> str:
        return "" if passed is None else " " + (self.yes if passed else self.no)


def _same_cpu(placement: Optional[dict]) -> bool:
    try:
        return bool(placement) and placement["a"]["after"]["cpu"] == placement["b"]["after"]["cpu"]  # type: ignore[index]
    except (KeyError, TypeError):
        return False


def _fmt_lat(v: Optional[float]) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _cell(records: list[dict], impl: str, test: str, key: str, fmt: Callable[[float], str], size: Optional[int] = None) -> str:
    rec = find(records, impl, test, size)
    if rec is None:
        return "—"
    if not rec["ok"]:
        return "FAILED"
    v = rec["stats"].get(key)
    return "—" if v is None else fmt(v)


def render(result: dict, unicode_ok: bool = True) -> str:
    """The whole report as markdown-ish text for a terminal."""
    mark = Marks(unicode_ok)
    records: list[dict] = result["records"]
    impls: list[str] = [i["name"] for i in result["impls"] if i["available"]]
    hp_impls = [i["name"] for i in result["impls"] if i["available"] and i["is_hyperpipe"]]
    verdict = {(t["impl"], t["id"]): t["passed"] for t in result["targets"]}
    sizes: list[int] = result["config"]["sizes"]
    tests_run = {r["test"] for r in records}
    out: list[str] = []
    cfg = result["config"]

    def m(impl: str, tid: str) -> str:
        return mark(verdict.get((impl, tid)))

    def rx(impl: str, test: str, tid: Optional[str] = None, size: Optional[int] = None) -> str:
        if impl == BASELINE:
            return "1x" if value(records, impl, test, HEADLINE_KEY[test], size) is not None else "—"
        r = ratio(records, impl, test, size)
        return "—" if r is None else _x(r) + (m(impl, tid) if tid else "")

    out.append("# hyperpipe benchmark")
    out.append("")
    out.append(f"Machine: {machine_line(result['machine'])}")
    out.append(f"Run: {result['started']}, {'--quick' if cfg['quick'] else 'full run'}; command: `{result['command']}`")
    if cfg.get("pin", "none") != "none":
        out.append("**Workers pinned** (`--pin " + cfg["pin"] + "`): " + ("both on one CPU" if cfg["pin"] == "same" else
                   "each on its own CPU") + "; the default, unpinned, measurement is where the scheduler puts them.")
    out.append("Implementations: " + "; ".join(f"`{i['name']}` = {i['label']}" for i in result["impls"] if i["available"]))
    for note in result.get("notes") or []:
        out.append(f"Note: {note}")
    out.append(f"Targets are marked {mark.yes} / {mark.no} on hyperpipe rows, each kind of row against its own: "
               "`hp-shm` (shared memory) against the goals below; `hp-socket`, the portable fallback, no worse than "
               "`mp`; `hp-tcp` no worse than the standard library's Listener/Client (`mp-tcp`); `-async` rows, which "
               "await in the initiating (latency) or receiving (arrays) worker, against the synchronous row of the "
               "same transport. Ratios are against `mp` in this run (latency: mp / this, throughput: this / mp), "
               "`hp-tcp`'s against `mp-tcp`.")

    if tests_run & {"lat_bytes", "lat_obj", "lat_asleep"}:
        out += ["", f"## Round-trip latency, µs ({cfg['lat_iters']:,} round trips after {cfg['lat_warmup']:,} warm-up; "
                f"asleep: {cfg['asleep_iters']:,} round trips, {cfg['asleep_gap_ms']:g} ms idle before each)", "",
                "Targets: shared memory 64 B p50 ≤ 3 µs and ≥ 8x mp, tuple p50 ≤ 5 µs, p99 ≤ 3x p50, asleep no worse "
                "than mp; socket no worse than mp.", "",
                "| impl | 64 B p50 | 64 B p99 | vs mp | tuple p50 | tuple p99 | vs mp | asleep p50 | asleep p99 | vs mp |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for impl in impls:
            cells = [f"`{impl}`",
                     _cell(records, impl, "lat_bytes", "p50_us", _fmt_lat) + m(impl, "rt64"),
                     _cell(records, impl, "lat_bytes", "p99_us", _fmt_lat) + m(impl, "rt64_tail"),
                     rx(impl, "lat_bytes", "rt64_x"),
                     _cell(records, impl, "lat_obj", "p50_us", _fmt_lat) + m(impl, "rtobj"),
                     _cell(records, impl, "lat_obj", "p99_us", _fmt_lat) + m(impl, "rtobj_tail"),
                     rx(impl, "lat_obj"),
                     _cell(records, impl, "lat_asleep", "p50_us", _fmt_lat),
                     _cell(records, impl, "lat_asleep", "p99_us", _fmt_lat),
                     rx(impl, "lat_asleep", "asleep_x")]
            out.append("| " + " | ".join(cells) + " |")
        noisy = [r for r in records if r["test"].startswith("lat_") and len(r.get("rounds") or []) > 1]
        if noisy:
            out += ["", "p50 of each round (separate worker pairs; the table pools all rounds; * = both workers "
                    "ended that round on the same CPU): " + "; ".join(
                        f"`{r['impl']}` {r['test'][4:]} " + " / ".join(
                            _fmt_lat(x["p50_us"]) + ("*" if _same_cpu(pl) else "")
                            for x, pl in zip(r["rounds"], r.get("placement") or [None] * len(r["rounds"])))
                        for r in noisy)]

    if tests_run & {"stream", "stream_batch"}:
        out += ["", f"## Streaming 100-byte messages, msg/s ({cfg['stream_msgs']:,} messages after "
                f"{cfg['stream_warmup']:,} warm-up; batch: send_bytes_many/recv_bytes_many, {cfg['batch']} per call)", "",
                "Targets: shared memory ≥ 1.5 M msg/s and ≥ 5x mp, the batch API goes further; socket no worse than mp.",
                "",
                "| impl | per message | vs mp | batch | vs mp per message |", "|---|---:|---:|---:|---:|"]
        for impl in impls:
            fmt = lambda v: f"{v:,.0f}"  # noqa: E731
            cells = [f"`{impl}`",
                     _cell(records, impl, "stream", "msgs_per_s", fmt) + m(impl, "stream"),
                     rx(impl, "stream", "stream_x"),
                     _cell(records, impl, "stream_batch", "msgs_per_s", fmt) + m(impl, "batch_gain"),
                     "—" if impl == BASELINE or find(records, impl, "stream_batch") is None else rx(impl, "stream_batch")]
            out.append("| " + " | ".join(cells) + " |")

    if tests_run & {"large", "large_zc", "large_zcs"}:
        reps = ", ".join(f"{size_label(s)}: {n}" for s, n in zip(sizes, cfg["large_reps"]))
        big = max(sizes)
        out += ["", f"## Large float64 arrays via send(arr)/recv(), GB/s (median; repetitions {reps}, the first is a "
                "warm-up; receiver reads every 4 KiB page and checks the data)", "",
                "Targets: shared memory ≥ 8 GB/s each, ≥ 35x mp at 256 MiB, copy=False ≥ 15 GB/s, peak RSS at "
                "256 MiB: receiver ≤ 1.2x, sender ≤ 2.2x the payload; socket no worse than mp at 256 MiB.", ""]
        head = ["impl"]
        for s in sizes:
            head += [size_label(s), "vs mp"]
        head.append(f"peak RSS at {size_label(big)}, MiB: sender / receiver" + (" (x payload)" if big >= 16 * MiB else ""))
        out += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (2 * len(sizes) + 1)]
        rows = [(impl, "large") for impl in impls]
        for extra in ("large_zc", "large_zcs"):
            rows += [(impl, extra) for impl in impls if any(find(records, impl, extra, s) for s in sizes)]
        names = {"large": "", "large_zc": " recv(copy=False)", "large_zcs": " allocate_buffer + recv(copy=False)"}
        for impl, test in rows:
            name = f"`{impl}`{names[test]}"
            cells = [name]
            for s in sizes:
                tid = {"large": f"large_{s}", "large_zc": f"zc_{s}"}.get(test)
                mark_ = m(impl, tid) if tid else ""  # the zero-copy-send row has no target
                cells.append(_cell(records, impl, test, "GBps_median", lambda v: f"{v:.2f}", s) + mark_)
                cells.append(rx(impl, test, "large_x" if (test == "large" and s == RSS_TARGET_SIZE) else None, s))
            rec = find(records, impl, test, big)
            if rec is None or not rec["ok"]:
                cells.append("—")
            else:
                snd, rcv = rec["stats"]["sender"]["peak_rss_mib"], rec["stats"]["receiver"]["peak_rss_mib"]
                pay = big / MiB
                rss = f"{snd:,.0f} / {rcv:,.0f}"
                if big >= 16 * MiB:  # below that the interpreter's own ~35 MiB dominate the ratio
                    rss += f" ({snd / pay:.2f}x / {rcv / pay:.2f}x)"
                if test == "large" and big == RSS_TARGET_SIZE:
                    rss = f"{snd:,.0f}{m(impl, 'rss_send')} / {rcv:,.0f}{m(impl, 'rss_recv')} ({snd / pay:.2f}x / {rcv / pay:.2f}x)"
                cells.append(rss)
            out.append("| " + " | ".join(cells) + " |")

    if "idle" in tests_run:
        out += ["", f"## Idle receiver: CPU used while blocked in recv for {cfg['idle_s']:g} s (all its threads)", "",
                "Target: < 1% of a core.", "", "| impl | CPU % | CPU s / wall s |", "|---|---:|---:|"]
        for impl in impls:
            rec = find(records, impl, "idle")
            if rec is None:
                cells = [f"`{impl}`", "—", "—"]
            elif not rec["ok"]:
                cells = [f"`{impl}`", "FAILED", ""]
            else:
                st = rec["stats"]
                cells = [f"`{impl}`", f"{st['cpu_percent']:.2f}{m(impl, 'idle')}", f"{st['cpu_s']:.4f} / {st['wall_s']:.3f}"]
            out.append("| " + " | ".join(cells) + " |")

    if result["targets"] and hp_impls:
        out += ["", "## Targets", "", "| target | " + " | ".join(f"`{i}`" for i in hp_impls) + " |",
                "|---|" + "---|" * len(hp_impls)]
        seen: dict[str, dict[str, dict]] = {}
        for t in result["targets"]:
            seen.setdefault(t["target"], {})[t["impl"]] = t
        for text, per_impl in seen.items():
            cells = [text]
            for impl in hp_impls:
                t = per_impl.get(impl)
                cells.append("—" if t is None else f"{t['shown']} {'PASS' if t['passed'] else 'FAIL'}")
            out.append("| " + " | ".join(cells) + " |")
        for impl in hp_impls:
            mine = [t for t in result["targets"] if t["impl"] == impl]
            out.append(f"\n`{impl}`: {sum(t['passed'] for t in mine)} of {len(mine)} measured targets met.")

    failed = [r for r in records if not r["ok"]]
    if failed:
        out += ["", "## Failed measurements", ""]
        for r in failed:
            where = r["test"] + (f" {size_label(r['size'])}" if r.get("size") else "")
            first = (r.get("error") or "").strip().splitlines()
            out.append(f"- `{r['impl']}` {where}: {first[-1] if first else 'failed'}")
    out.append("")
    out.append(f"Total time {result['duration_s']:.0f} s.")
    return "\n".join(out)


# -- plot ------------------------------------------------------------------------------


def plot(result: dict, path: str) -> None:
    """Bar charts of the headline numbers (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["records"]
    impls = [i["name"] for i in result["impls"] if i["available"]]
    sizes = result["config"]["sizes"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    panels = [
        (axes[0][0], "Round trip p50 (µs, lower is better)",
         [("64 B", "lat_bytes", "p50_us", None), ("tuple", "lat_obj", "p50_us", None),
          ("asleep", "lat_asleep", "p50_us", None)]),
        (axes[0][1], "Streaming 100 B (M msg/s)",
         [("per message", "stream", "msgs_per_s", None), ("batch", "stream_batch", "msgs_per_s", None)]),
        (axes[1][0], "Large arrays (GB/s)",
         [(size_label(s), "large", "GBps_median", s) for s in sizes]
         + [(size_label(s) + "\nzero-copy", "large_zc", "GBps_median", s) for s in sizes]
         + [(size_label(s) + "\nzero-copy send", "large_zcs", "GBps_median", s) for s in sizes]),
        (axes[1][1], "Idle receiver (CPU %)", [("idle", "idle", "cpu_percent", None)]),
    ]
    for ax, title, groups in panels:
        groups = [g for g in groups if any(value(records, i, g[1], g[2], g[3]) is not None for i in impls)]
        ax.set_title(title)
        if not groups:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        width = 0.8 / max(1, len(impls))
        shown: list[float] = []
        for k, impl in enumerate(impls):
            ys = []
            for _, test, key, size in groups:
                v = value(records, impl, test, key, size)
                ys.append((v / 1e6 if key == "msgs_per_s" else v) if v is not None else 0.0)
            shown += [y for y in ys if y > 0]
            xs = [g + k * width for g in range(len(groups))]
            ax.bar(xs, ys, width, label=impl)
        if shown and max(shown) / min(shown) > 20:  # hyperpipe and mp differ by orders of magnitude
            ax.set_yscale("log")
        ax.set_xticks([g + width * (len(impls) - 1) / 2 for g in range(len(groups))])
        ax.set_xticklabels([g[0] for g in groups], fontsize=8)
        ax.legend(fontsize=7, loc="best", framealpha=0.7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"hyperpipe benchmark - {machine_line(result['machine'])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
