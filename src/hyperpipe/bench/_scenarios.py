"""What is measured, and how one measurement runs in two fresh worker processes.

Every measurement starts two new processes from the orchestrator: ``a`` (initiator /
sender) and ``b`` (responder / receiver). Both open their end, meet at a barrier, run the
scenario, meet again and close. Timestamps are ``time.perf_counter_ns()``
(CLOCK_MONOTONIC on Linux), so a time taken in ``a`` and one taken in ``b`` can be
subtracted. The orchestrator waits for both results with a deadline and kills the workers
when anything goes wrong: a failed or hung measurement becomes a failed row, never a hang.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
import traceback
from array import array
from multiprocessing.connection import wait as mp_wait
from typing import Any, Callable, Optional

from ._impls import Impl

clock = time.perf_counter_ns

LAT_BYTES_MSG = b"\x5a" * 64
LAT_OBJ_MSG = (42, "hello", 3.14)
STREAM_MSG = b"\xa5" * 100
STREAM_LAST = b"\x3c" * 100
PAGE_FLOATS = 4096 // 8  # float64 elements per 4 KiB page


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _vm_hwm_kib() -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _placement() -> dict:
    """Which CPU this process is on now, and its context switches so far (for the JSON).

    Two workers sharing one vCPU explain slow spinning round trips.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"voluntary_switches": usage.ru_nvcsw, "involuntary_switches": usage.ru_nivcsw}
    try:
        with open("/proc/self/stat") as f:
            out["cpu"] = int(f.read().rsplit(")", 1)[1].split()[36])  # field 39, "processor"
    except (OSError, IndexError, ValueError):
        pass
    return out


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- scenarios (run in the workers) -------------------------------------------------------


def latency(impl: Impl, conn: Any, role: str, p: dict, barrier: Any) -> dict:
    """Round trips: ``a`` sends, ``b`` echoes, ``a`` times each one separately.

    With ``gap_s`` > 0 ``a`` sleeps that long before each round trip, so ``b`` has gone
    past any spin window and sleeps in the kernel when the message arrives.
    """
    n, warmup, gap = p["iters"], p["warmup"], p.get("gap_s", 0.0)
    msg: Any
    if p["payload"] == "bytes":
        msg, send, recv = LAT_BYTES_MSG, conn.send_bytes, conn.recv_bytes
    else:
        msg, send, recv = LAT_OBJ_MSG, conn.send, conn.recv
    if role == "b":
        for _ in range(warmup + n):
            send(recv())
        return {}
    timed = getattr(impl, "timed_round_trips", None)
    if timed is not None and not gap:
        # Awaited round trips, all inside one event loop (hyperpipe.asyncio).
        start = clock()
        times, last = timed(conn, msg, n, warmup, "bytes" if p["payload"] == "bytes" else "object")
        total = clock() - start
        ok = (bytes(last) == msg) if p["payload"] == "bytes" else (last == msg)
        return {"lat_ns": array("q", times).tobytes(), "total_ns": total, "ok": ok,
                "why": "" if ok else "echo differs"}
    for _ in range(warmup):
        send(msg)
        recv()
    samples = array("q", bytes(8 * n))
    reply: Any = None
    sleep = time.sleep
    start = clock()
    for i in range(n):
        if gap:
            sleep(gap)
        t0 = clock()
        send(msg)
        reply = recv()
        samples[i] = clock() - t0
    total = clock() - start
    ok = (bytes(reply) == msg) if p["payload"] == "bytes" else (reply == msg)
    return {"lat_ns": samples.tobytes(), "total_ns": total, "ok": ok, "why": "" if ok else "echo differs"}


def stream(impl: Impl, conn: Any, role: str, p: dict, barrier: Any) -> dict:
    """One-way stream of 100-byte messages, one call per message on both sides."""
    n, warmup = p["msgs"], p["warmup"]
    if role == "a":
        send = conn.send_bytes
        for _ in range(warmup):
            send(STREAM_MSG)
        barrier.wait()
        t0 = clock()
        for _ in range(n - 1):
            send(STREAM_MSG)
        send(STREAM_LAST)
        return {"t0": t0, "t_sent": clock()}
    recv = conn.recv_bytes
    for _ in range(warmup):
        recv()
    barrier.wait()
    nbytes = 0
    for _ in range(n - 1):
        nbytes += len(recv())
    last = recv()
    t1 = clock()
    ok = bytes(last) == STREAM_LAST and nbytes == 100 * (n - 1)
    return {"t1": t1, "ok": ok, "why": "" if ok else "stream content differs"}


def stream_batch(impl: Impl, conn: Any, role: str, p: dict, barrier: Any) -> dict:
    """The same stream through ``send_bytes_many`` / ``recv_bytes_many``."""
    n, warmup, batch = p["msgs"], p["warmup"], p["batch"]
    if role == "a":
        send_many = conn.send_bytes_many
        full = [STREAM_MSG] * batch
        for _ in range(max(1, warmup // batch)):
            send_many(full)
        barrier.wait()
        t0 = clock()
        left = n
        while left > batch:
            send_many(full)
            left -= batch
        send_many([STREAM_MSG] * (left - 1) + [STREAM_LAST])
        return {"t0": t0, "t_sent": clock()}
    recv_many = conn.recv_bytes_many
    got = 0
    while got < max(1, warmup // batch) * batch:
        got += len(recv_many(batch))
    barrier.wait()
    got, nbytes, last = 0, 0, b""
    while got < n:
        msgs = recv_many(batch)
        got += len(msgs)
        for m in msgs:
            nbytes += len(m)
        if msgs:
            last = msgs[-1]
    t1 = clock()
    ok = got == n and bytes(last) == STREAM_LAST and nbytes == 100 * n
    return {"t1": t1, "ok": ok, "why": "" if ok else f"got {got} messages / {nbytes} bytes, last differs"}


def large(impl: Impl, conn: Any, role: str, p: dict, barrier: Any) -> dict:
    """One-way float64 arrays; the receiver reads every page before the clock stops.

    With ``zero_copy_send`` the array lives in a buffer from ``impl.shared_array`` (for
    hyperpipe, ``allocate_buffer``): what is measured is handing over a filled buffer.
    Per repetition the sender stamps the first and last element with the repetition
    number only after the receiver is done with the previous one (some peers' send returns
    before the data was copied), takes t0 and sends. The receiver takes t1 once ``recv``
    returned and it summed every 512th element (one read per 4 KiB page: a lazily mapped
    view pays for its page faults as a copy does), then checks dtype, shape, the stamps and
    that sum.
    """
    import numpy as np

    nbytes, reps, zero_copy = p["nbytes"], p["reps"], p.get("zero_copy", False)
    n = nbytes // 8
    if role == "a":
        if p.get("zero_copy_send"):
            # An array in a buffer the transport sends without copying (allocate_buffer),
            # filled once, as a producer would fill it in place.
            arr = impl.shared_array(conn, n)
            for at in range(0, n, 1 << 20):  # in pieces: no temporary the size of the array
                arr[at : at + (1 << 20)] = np.arange(at, min(n, at + (1 << 20)), dtype=np.float64)
        else:
            arr = np.arange(n, dtype=np.float64)  # written, so its pages are in before timing
        t0s = []
        for rep in range(reps):
            barrier.wait()
            arr[0] = rep
            arr[-1] = rep
            t0 = clock()
            impl.send_array(conn, arr)
            t0s.append(t0)
        barrier.wait()
        return {"t0": t0s}
    pages = (n + PAGE_FLOATS - 1) // PAGE_FLOATS
    # sum of x[::512] for arange with x[0] = rep (x[-1] is never a multiple of 512 here)
    base_sum = float(PAGE_FLOATS * pages * (pages - 1) // 2)
    last_on_page = (n - 1) % PAGE_FLOATS == 0
    t1s: list[int] = []
    failures: list[str] = []

    def received(x: Any, rep: int) -> None:
        touched = float(x[::PAGE_FLOATS].sum())
        t1s.append(clock())
        expected = base_sum + rep
        if last_on_page and n > 1:
            expected += rep - (n - 1)
        good = (
            isinstance(x, np.ndarray)
            and x.dtype == np.float64
            and x.shape == (n,)
            and x[0] == rep
            and x[-1] == rep
            and touched == expected
        )
        if not good and not failures:
            failures.append(f"rep {rep}: received array differs ({type(x).__name__} {getattr(x, 'shape', None)})")

    run_async = getattr(impl, "run_receiver", None)
    arecv = getattr(impl, "arecv_array", None)
    if run_async is not None and arecv is not None:
        # One event loop for every repetition: awaiting recv() is what is measured, not
        # setting a loop up per array.
        async def receive_all() -> None:
            for rep in range(reps):
                barrier.wait()
                received(await arecv(conn), rep)

        run_async(receive_all())
    else:
        for rep in range(reps):
            barrier.wait()
            received(impl.recv_array(conn, zero_copy), rep)
    barrier.wait()
    return {"t1": t1s, "ok": not failures, "why": failures[0] if failures else ""}


def idle(impl: Impl, conn: Any, role: str, p: dict, barrier: Any) -> dict:
    """CPU used by a receiver blocked in ``recv`` while nothing arrives for ``idle_s``.

    One message first (so everything is warm), then the sender sleeps ``idle_s`` and sends
    the next one. The receiver measures its own CPU time (all threads) and wall time across
    that one blocking ``recv``; the spin window, if any, is included.
    """
    idle_s = p["idle_s"]
    if role == "a":
        conn.send_bytes(LAT_BYTES_MSG)
        time.sleep(idle_s)
        conn.send_bytes(STREAM_LAST)
        return {}
    conn.recv_bytes()
    cpu0, t0 = _cpu_seconds(), clock()
    msg = conn.recv_bytes()
    t1, cpu1 = clock(), _cpu_seconds()
    ok = bytes(msg) == STREAM_LAST
    return {"cpu_s": cpu1 - cpu0, "wall_s": (t1 - t0) / 1e9, "ok": ok, "why": "" if ok else "message differs"}


SCENARIOS: dict[str, Callable[..., dict]] = {
    "latency": latency,
    "stream": stream,
    "stream_batch": stream_batch,
    "large": large,
    "idle": idle,
}


def _worker(impl: Impl, end: Any, role: str, scenario: str, params: dict, barrier: Any, results: Any,
            cpu: Optional[int] = None) -> None:
    try:
        if cpu is not None:  # --pin
            os.sched_setaffinity(0, {cpu})
        start_rss = {"maxrss_kib": _maxrss_kib(), "vmhwm_kib": _vm_hwm_kib()}
        if role == "a":  # a opens first (a zmq socket binds before the peer connects)
            conn = impl.open(end, role, params)
            barrier.wait()
            barrier.wait()
        else:
            barrier.wait()
            conn = impl.open(end, role, params)
            barrier.wait()
        before = _placement()
        out = SCENARIOS[scenario](impl, conn, role, params, barrier) or {}
        out["placement"] = {"before": before, "after": _placement()}
        out["rss"] = {"start": start_rss, "end": {"maxrss_kib": _maxrss_kib(), "vmhwm_kib": _vm_hwm_kib()}}
        statistics = getattr(conn, "statistics", None)  # hyperpipe's counters (sleeps, wake-ups, ...)
        if callable(statistics):
            try:
                out["conn_statistics"] = {k: v for k, v in statistics().items() if isinstance(v, (int, float, str))}
            except Exception as exc:
                out["conn_statistics"] = {"error": repr(exc)}
        barrier.wait()  # both done: nothing is in flight when the ends close
        impl.close(conn)
        results.send((role, "ok", out))
    except BaseException:
        try:
            barrier.abort()
        except Exception:
            pass
        results.send((role, "error", traceback.format_exc(limit=8)))


# -- orchestrator side ---------------------------------------------------------------------


def _stop(proc: Any) -> None:
    """End one worker: a polite SIGTERM, then SIGKILL."""
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=2)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=2)


def run_pair(impl: Impl, scenario: str, params: dict, *, timeout: float, start_method: str = "fork",
             pin: Optional[dict] = None) -> dict:
    """Run one measurement in two fresh workers; return both results or why it failed.

    ``pin``: the CPU of each worker (``{"a": 0, "b": 1}``), set as it starts; None: unpinned.

    Returns ``{"ok": True, "a": {...}, "b": {...}, "wall_s": ...}`` or
    ``{"ok": False, "error": "...", "wall_s": ...}``. Never blocks much past ``timeout``:
    on a timeout, an error or a worker that died, both workers are killed.
    """
    ctx: Any = multiprocessing.get_context(start_method)
    begin = time.monotonic()
    try:
        end_a, end_b = impl.pair(ctx, scenario, params)
    except Exception:
        return {"ok": False, "error": "creating the channel failed:\n" + traceback.format_exc(limit=4), "wall_s": 0.0}
    barrier = ctx.Barrier(2, timeout=timeout)
    # One result pipe per worker, and a blocking wait on them and on the workers'
    # sentinels: the orchestrator must not wake up periodically, since a third runnable
    # task on a 2-core machine pushes both workers onto one core and shows up in the tail.
    pipes = {role: ctx.Pipe(duplex=False) for role in ("a", "b")}
    procs = {
        role: ctx.Process(
            target=_worker,
            args=(impl, end, role, scenario, params, barrier, pipes[role][1], (pin or {}).get(role)),
            name=f"hyperpipe-bench-{impl.name}-{scenario}-{role}",
            daemon=True,
        )
        for role, end in (("a", end_a), ("b", end_b))
    }
    got: dict[str, tuple[str, Any]] = {}
    try:
        for proc in procs.values():
            proc.start()
        for reader, writer in pipes.values():
            writer.close()  # a worker that dies leaves EOF on its pipe
        impl.parent_release(end_a, end_b)
        limit = begin + timeout
        while len(got) < 2:
            pending = [role for role in procs if role not in got]
            watched = [pipes[role][0] for role in pending] + [procs[role].sentinel for role in pending]
            if not mp_wait(watched, timeout=max(0.0, limit - time.monotonic())):
                break
            for role in pending:
                reader, proc = pipes[role][0], procs[role]
                status, payload = "", None
                try:
                    if reader.poll(0):  # a result, or EOF: the worker is gone
                        _, status, payload = reader.recv()
                except (EOFError, OSError):
                    pass
                if not status and proc.exitcode is None:
                    continue  # still working (its sentinel did not fire)
                if not status:  # exited, and everything it sent has been read
                    status, payload = "error", f"worker {role} exited with code {proc.exitcode} without a result"
                got[role] = (status, payload)
                if status != "ok":
                    # The other worker is now stuck at a broken barrier or in recv, or it
                    # failed first (the root cause): give its report a second, then stop it.
                    limit = min(limit, time.monotonic() + 1.0)
    finally:
        complete = len(got) == 2 and all(status == "ok" for status, _ in got.values())
        for proc in procs.values():
            proc.join(timeout=5 if complete else 0.2)
            _stop(proc)
        try:
            impl.cleanup(end_a, end_b)
        except Exception:
            pass
        for reader, _ in pipes.values():
            reader.close()
    wall = time.monotonic() - begin
    errors = [f"[{role}] {payload}" for role, (status, payload) in sorted(got.items()) if status != "ok"]
    if len(got) < 2 and not errors:
        errors.append(f"timed out after {timeout:.0f} s (results from: {sorted(got) or 'none'})")
    if errors:
        return {"ok": False, "error": "\n".join(errors), "wall_s": wall}
    return {"ok": True, "a": got["a"][1], "b": got["b"][1], "wall_s": wall}
