"""Pool, ProcessPoolExecutor and Queue rows: the standard library against hyperpipe's
``get_context()`` and ``install()`` (and faster-fifo's queue, loky's executor and mpire's
pool when they are installed), in one run.

Each row runs every implementation back to back with the same counts and reports the ratio
to the standard library measured in this run. ``hyperpipe-bench --only pool,queue``.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

GROUPS = {
    "pool": ("pool_map_tiny", "executor_map_tiny", "pool_map_arrays"),
    "queue": ("queue_1to1", "queue_4to4", "queue_rtt"),
}
ROWS = GROUPS["pool"] + GROUPS["queue"]

#: row -> (what it counts, target ratio to the stdlib, "higher" or "lower" is better)
TARGETS = {
    "pool_map_tiny": ("tasks/s", 3.0, "higher"),
    "executor_map_tiny": ("tasks/s", 3.0, "higher"),
    "pool_map_arrays": ("GB/s", 10.0, "higher"),
    "queue_1to1": ("items/s", 5.0, "higher"),
    "queue_4to4": ("items/s", 5.0, "higher"),
    "queue_rtt": ("p50 us", 10.0, "lower"),
}

FULL = dict(tasks=20_000, arrays=64, array_mib=16, items=100_000, rtt_iters=5_000)
QUICK = dict(tasks=5_000, arrays=8, array_mib=16, items=20_000, rtt_iters=1_000)


def split_only(text: str) -> tuple[list[str], str]:
    """``--only``: this module's rows (groups ``pool``, ``queue`` or row names) and the rest."""
    rows: list[str] = []
    rest = []
    for part in (p.strip() for p in text.split(",")):
        if part in GROUPS:
            rows += [r for r in GROUPS[part] if r not in rows]
        elif part in ROWS:
            rows.append(part) if part not in rows else None
        elif part:
            rest.append(part)
    return rows, ",".join(rest)


def _inc(x: int) -> int:
    return x + 1


def _double(a: Any) -> Any:
    return a * 2


@dataclass
class QueueImpl:
    name: str
    make: Callable[[], Any]  # a queue, given the start method's context is set
    ctx: Any


def _contexts(method: str) -> dict[str, Any]:
    import hyperpipe

    return {"mp": multiprocessing.get_context(method), "hp": hyperpipe.get_context(method)}


def _faster_fifo_queue() -> Any:
    importlib.import_module("faster_fifo_reduction")  # lets the queue travel to spawn children
    return importlib.import_module("faster_fifo").Queue(max_size_bytes=8 << 20)


def queue_impls(method: str) -> list[QueueImpl]:
    ctxs = _contexts(method)
    impls = [QueueImpl(name, c.Queue, c) for name, c in ctxs.items()]
    if importlib.util.find_spec("faster_fifo") is not None:
        impls.append(QueueImpl("faster-fifo", _faster_fifo_queue, ctxs["mp"]))
    return impls


# -- the measured programs -------------------------------------------------------------------


def pool_map_tiny(ctx: Any, cfg: dict) -> float:
    with ctx.Pool(2) as pool:
        pool.map(_inc, range(200), chunksize=1)  # workers started and warm
        t = time.perf_counter()
        pool.map(_inc, range(cfg["tasks"]), chunksize=1)
        return cfg["tasks"] / (time.perf_counter() - t)


def executor_map_tiny(ctx: Any, cfg: dict) -> float:
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        list(ex.map(_inc, range(200)))
        t = time.perf_counter()
        for _ in ex.map(_inc, range(cfg["tasks"])):
            pass
        return cfg["tasks"] / (time.perf_counter() - t)


def _installed(program: Callable[[Any, dict], float], method: str, cfg: dict) -> float:
    """``program`` unchanged, with the standard library's context, under ``install()``."""
    import hyperpipe

    hyperpipe.install()
    try:
        return program(multiprocessing.get_context(method), cfg)
    finally:
        hyperpipe.uninstall()


def loky_map_tiny(method: str, cfg: dict) -> float:
    """``executor_map_tiny`` on loky's executor (its own start method, whatever ``method``)."""
    import loky  # type: ignore[import-not-found]  # optional peer

    with loky.ProcessPoolExecutor(2) as ex:
        list(ex.map(_inc, range(200)))
        t = time.perf_counter()
        for _ in ex.map(_inc, range(cfg["tasks"])):
            pass
        return cfg["tasks"] / (time.perf_counter() - t)


def mpire_map_tiny(method: str, cfg: dict) -> float:
    """``pool_map_tiny`` on mpire's pool."""
    from mpire import WorkerPool  # type: ignore[import-not-found]  # optional peer

    with WorkerPool(n_jobs=2, start_method=method) as pool:
        pool.map(_inc, range(200), chunk_size=1)
        t = time.perf_counter()
        pool.map(_inc, range(cfg["tasks"]), chunk_size=1)
        return cfg["tasks"] / (time.perf_counter() - t)


#: row -> (peer package, its program), run when the package is installed
PEERS = {"executor_map_tiny": ("loky", loky_map_tiny), "pool_map_tiny": ("mpire", mpire_map_tiny)}


def pool_map_arrays(ctx: Any, cfg: dict) -> float:
    import numpy as np

    array = np.ones(cfg["array_mib"] << 17)  # float64: MiB * 2**20 / 8
    with ctx.Pool(2) as pool:
        pool.map(_double, [array] * 2, chunksize=1)
        t = time.perf_counter()
        for result in pool.imap(_double, (array for _ in range(cfg["arrays"])), chunksize=1):
            assert result.nbytes == array.nbytes
        elapsed = time.perf_counter() - t
    return 2 * cfg["arrays"] * array.nbytes / elapsed / 1e9  # in and out


def _producer(q: Any, n: int, tag: int, ready: Any) -> None:
    ready.wait()  # all at once, when every process is up: the row times the queue, not starting
    for i in range(n):
        q.put((tag, i))


def _consumer(q: Any, n: int, done: Any, ready: Any) -> None:
    ready.wait()
    for _ in range(n):
        q.get()
    done.put(n)


def _queue_run(impl: QueueImpl, items: int, producers: int, consumers: int) -> float:
    ctx = impl.ctx
    q = impl.make()
    done = ctx.SimpleQueue()
    per_producer = items // producers
    per_consumer = per_producer * producers // consumers
    ready = ctx.Barrier(producers + consumers + 1)
    procs = [ctx.Process(target=_consumer, args=(q, per_consumer, done, ready)) for _ in range(consumers)]
    procs += [ctx.Process(target=_producer, args=(q, per_producer, tag, ready)) for tag in range(producers)]
    for p in procs:
        p.start()
    ready.wait(60)
    t = time.perf_counter()
    for _ in range(consumers):
        done.get()
    elapsed = time.perf_counter() - t
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    return per_consumer * consumers / elapsed


def _echo(inq: Any, outq: Any, n: int) -> None:
    for _ in range(n):
        outq.put(inq.get())


def _queue_rtt(impl: QueueImpl, iters: int) -> float:
    ctx = impl.ctx
    inq, outq = impl.make(), impl.make()
    p = ctx.Process(target=_echo, args=(inq, outq, iters + 100))
    p.start()
    payload = b"x" * 64
    for _ in range(100):
        inq.put(payload)
        outq.get()
    samples = []
    for _ in range(iters):
        t = time.perf_counter_ns()
        inq.put(payload)
        outq.get()
        samples.append(time.perf_counter_ns() - t)
    p.join(60)
    return statistics.median(samples) / 1000.0


# -- running and reporting -------------------------------------------------------------------


def _measure(row: str, cfg: dict, method: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if row in GROUPS["pool"]:
        program = {"pool_map_tiny": pool_map_tiny, "executor_map_tiny": executor_map_tiny,
                   "pool_map_arrays": pool_map_arrays}[row]
        for name, ctx in _contexts(method).items():
            out[name] = _guarded(lambda: program(ctx, cfg))
        out["hp-install"] = _guarded(lambda: _installed(program, method, cfg))
        peer = PEERS.get(row)
        if peer is not None and importlib.util.find_spec(peer[0]) is not None:
            out[peer[0]] = _guarded(lambda: peer[1](method, cfg))
        return out
    for impl in queue_impls(method):
        if row == "queue_1to1":
            out[impl.name] = _guarded(lambda: _queue_run(impl, cfg["items"], 1, 1))
        elif row == "queue_4to4":
            out[impl.name] = _guarded(lambda: _queue_run(impl, cfg["items"], 4, 4))
        else:
            out[impl.name] = _guarded(lambda: _queue_rtt(impl, cfg["rtt_iters"]))
    return out


def _guarded(run: Callable[[], float]) -> Any:
    try:
        return run()
    except Exception as exc:  # a failed row is reported, the others still run
        return f"failed: {exc!r}"


def run(rows: list[str], quick: bool, method: str = "fork", progress: Optional[Callable[[str], None]] = None) -> dict:
    """Measure ``rows``; returns ``{"config", "rows": {row: {impl: value or error}}}``."""
    cfg = dict(QUICK if quick else FULL)
    if "pool_map_arrays" in rows and importlib.util.find_spec("numpy") is None:
        rows = [r for r in rows if r != "pool_map_arrays"]
    results = {}
    for row in rows:
        if progress:
            progress(f"{row} ...")
        results[row] = _measure(row, cfg, method)
        if progress:
            progress(f"{row}: {results[row]}")
    return {"config": cfg, "method": method, "load": os.getloadavg(), "rows": results}


def failed(result: dict) -> bool:
    """True if a row of ``result`` (from ``run``) failed for some implementation."""
    return any(isinstance(v, str) for row in result["rows"].values() for v in row.values())


def render(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"Pool / ProcessPoolExecutor / Queue ({result['method']}, 2 workers; load "
        + " ".join(f"{x:.2f}" for x in result["load"]) + ")",
        f"  tasks {cfg['tasks']:,}, arrays {cfg['arrays']} x {cfg['array_mib']} MiB float64, "
        f"queue items {cfg['items']:,}, round trips {cfg['rtt_iters']:,}",
        f"  {'row':<18} {'impl':<12} {'value':>14} {'vs mp':>8} {'target':>8}",
    ]
    for row, values in result["rows"].items():
        unit, target, better = TARGETS[row]
        base = values.get("mp")
        for name, v in values.items():
            if isinstance(v, str):
                lines.append(f"  {row:<18} {name:<12} {v}")
                continue
            ratio = ""
            verdict = ""
            if isinstance(base, float) and name != "mp":
                r = v / base if better == "higher" else base / v
                ratio = f"{r:.2f}x"
                if name in ("hp", "hp-install"):
                    verdict = f">={target:g}x " + ("met" if r >= target else "MISSED")
            lines.append(f"  {row:<18} {name:<12} {v:>10,.2f} {unit:<7}{ratio:>6} {verdict}")
    return "\n".join(lines)
