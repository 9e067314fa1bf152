"""A Pool worker's unpickling of a task whose pickle names its functions up front
(``_queues._loads_task``): the functions are found by name once per front, then per task
only checked, and the rest unpickled with them standing in. Each fallback is checked, and
every outcome (value or exception) is pickle's own for the same bytes."""

from __future__ import annotations

import gc
import io
import multiprocessing.pool as mpp
import pickle
import random
import subprocess
import sys
import textwrap
import types
import weakref

import pytest

import hyperpipe
from hyperpipe import _pool, _queues

import pool_support as support
from pool_support import TIMEOUT


def _task_pickle(task: tuple) -> bytes:
    """What ``_TaskSender`` sends for ``task`` (its functions named up front)."""
    reader, writer = hyperpipe.Pipe(duplex=False)
    try:
        data = _pool._TaskSender(writer)._pickle(task)
    finally:
        reader.close()
        writer.close()
    assert data is not None and data[2:3] == b"\x8c"
    return data


def _outcome(load, data: bytes):
    try:
        return "value", repr(load(data))
    except Exception as exc:  # noqa: BLE001 - the outcome is compared, whatever it is
        return type(exc), str(exc)


@pytest.fixture
def loads_seen(monkeypatch):
    """The calls of ``_queues._unpickle`` made while a task is loaded: (bytes, buffers)."""
    calls = []
    unpickle = _queues._unpickle

    def recording(data, **kwargs):
        calls.append((bytes(data), kwargs.get("buffers")))
        return unpickle(data, **kwargs)

    monkeypatch.setattr(_queues, "_unpickle", recording)
    monkeypatch.setattr(_queues, "_task_front", None)
    return calls


def test_a_task_is_unpickled_with_its_functions_standing_in(loads_seen):
    tasks = [(3, i, mpp.mapstar, ((support.inc, tuple(range(i))),), {}) for i in range(3)]
    for task in tasks:
        loaded = _queues._loads_task(_task_pickle(task))
        assert loaded == task and loaded[2] is mpp.mapstar and loaded[3][0][0] is support.inc
    # every task took the stand-in path: its functions came from buffers=, not by name
    assert [buffers for _, buffers in loads_seen] == [(mpp.mapstar, support.inc)] * 3
    assert all(b"pool_support" not in data for data, _ in loads_seen)


def test_one_function_apply_tasks_too(loads_seen):
    task = (5, 0, support.inc, (41,), {"k": [1, 2]})
    assert _queues._loads_task(_task_pickle(task)) == task
    assert loads_seen[-1][1] == (support.inc,)


def test_a_rebound_name_gives_the_new_function_as_pickle_does(loads_seen, monkeypatch):
    data = _task_pickle((3, 0, mpp.mapstar, ((support.inc, (1,)),), {}))
    assert _queues._loads_task(data)[3][0][0] is support.inc
    monkeypatch.setattr(support, "inc", support.fail_on)
    assert pickle.loads(data)[3][0][0] is support.fail_on
    assert _queues._loads_task(data)[3][0][0] is support.fail_on
    monkeypatch.delattr(support, "inc")
    assert _outcome(_queues._loads_task, data) == _outcome(pickle.loads, data)
    assert _outcome(pickle.loads, data)[0] is AttributeError


def test_a_module_getattr_that_raises_raises_as_in_pickle(loads_seen, monkeypatch):
    data = _task_pickle((3, 0, mpp.mapstar, ((support.inc, (1,)),), {}))
    assert _queues._loads_task(data)[1] == 0  # the front is known
    raising = types.ModuleType("pool_support")
    raising.__getattr__ = lambda name: (_ for _ in ()).throw(RuntimeError(f"no {name} here"))
    monkeypatch.setitem(sys.modules, "pool_support", raising)
    assert _outcome(pickle.loads, data) == (RuntimeError, "no inc here")
    assert _outcome(_queues._loads_task, data) == (RuntimeError, "no inc here")


def test_a_module_not_imported_yet_is_imported_by_pickle(loads_seen, monkeypatch):
    data = _task_pickle((3, 0, mpp.mapstar, ((support.inc, (1,)),), {}))
    monkeypatch.delitem(sys.modules, "pool_support")
    loaded = _queues._loads_task(data)
    assert loaded[3][0][0](1) == 2 and "pool_support" in sys.modules
    assert loads_seen[-1] == (data, None)  # by name, the plain way


def test_a_big_task_is_unpickled_as_it_is(loads_seen):
    task = (3, 0, mpp.mapstar, ((support.inc, (b"x" * _queues.TASK_FRONT_MAX,)),), {})
    data = _task_pickle(task)
    assert _queues._loads_task(data) == task
    assert loads_seen == [(data, None)]


def test_other_pickles_starting_alike_are_unpickled_as_they_are(loads_seen):
    for obj in ["", "ab", ("mod", "name")]:
        data = pickle.dumps(obj, 5)
        assert _queues._loads_task(data) == obj
    plain_front = b"\x80\x05\x8c\x03abc\x8c\x01d\x93."  # a global, not memoized
    assert _outcome(_queues._loads_task, plain_front) == _outcome(pickle.loads, plain_front)
    assert all(buffers is None for _, buffers in loads_seen)


def test_every_truncation_and_corruption_fails_as_pickle_does(loads_seen):
    data = _task_pickle((3, 7, mpp.mapstar, ((support.inc, ((1, "a"), [2.5], {"k": b"v"})),), {}))
    rng = random.Random(9)
    variants = [data[:n] for n in range(len(data))]
    for _ in range(300):
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            corrupt[rng.randrange(len(data))] = rng.randrange(256)
        variants.append(bytes(corrupt))
    variants.append(data[:36] + b"\x97." + data[36:])  # asks for a buffer of its own
    front = _queues._learn_task_front(data)
    assert front is not None
    variants.append(front.front + b"\x97.")
    for variant in variants:
        assert _outcome(_queues._loads_task, variant) == _outcome(pickle.loads, variant), variant
    assert any(buffers for _, buffers in loads_seen)  # the stand-in path ran too


class _Payload:
    pass


def test_nothing_of_a_task_stays_alive(loads_seen):
    payload = _Payload()
    ref = weakref.ref(payload)
    loaded = _queues._loads_task(_task_pickle((3, 0, mpp.mapstar, ((support.inc, (payload,)),), {})))
    assert type(loaded[3][0][1][0]) is _Payload
    del payload, loaded
    gc.collect()
    assert ref() is None
    assert _queues._task_front.functions == (mpp.mapstar, support.inc)


def test_a_simple_queue_get_takes_the_path(loads_seen):
    q = hyperpipe.get_context("fork").SimpleQueue()
    try:
        task = (3, 0, mpp.mapstar, ((support.inc, (1, 2)),), {})
        _pool._TaskSender(q._writer).put(task)
        q.put([1, 2])  # an ordinary item: framed, never a task front
        assert q.get() == task
        assert q.get() == [1, 2]
        assert [buffers for _, buffers in loads_seen] == [(mpp.mapstar, support.inc), None]
    finally:
        q.close()


def test_audit_events_are_pickle_s_own():
    # audit hooks cannot be removed: a child process of its own
    script = textwrap.dedent("""
        import multiprocessing.pool as mpp, pickle, sys
        sys.path[:0] = %r
        import pool_support as support
        from hyperpipe import _pool, _queues
        import hyperpipe
        sender = _pool._TaskSender(hyperpipe.Pipe(duplex=False)[1])
        data = sender._pickle((3, 0, mpp.mapstar, ((support.inc, (1,)),), {}))
        events = []
        sys.addaudithook(lambda e, a: events.append(a) if e == "pickle.find_class" else None)
        pickle.loads(data)
        plain, events[:] = list(events), []
        _queues._loads_task(data)
        _queues._loads_task(data)
        print(plain * 2 == events, plain)
    """) % (sys.path,)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True [('multiprocessing.pool', 'mapstar'), ('pool_support', 'inc')]"), out.stdout


def test_a_worker_sees_a_rebinding_between_tasks(flavor):
    # the first task rebinds its own name in the worker: the next ones get the new function
    with flavor.ctx.Pool(1) as pool:
        results = pool.map(support.rebinds_itself, [1, 2, 3], chunksize=1)
        assert results == [("first", 1), ("rebound", 2), ("rebound", 3)]
    pool.join()


def test_every_start_method_s_workers_take_the_shared_memory_path(flavor):
    # a worker closes the queue ends it does not use: under spawn and forkserver before
    # the mode is worked out, which must not make it fall back to Connection.send/recv
    with flavor.ctx.Pool(1) as pool:
        modes, names = pool.map(support.worker_task_path, range(3), chunksize=1)[-1]
    pool.join()
    if flavor.is_stdlib:
        assert set(modes) <= {_queues.NOT_NATIVE} and names is None  # patched earlier or not
    else:
        assert modes == [_queues.NATIVE_SHM] * 2
        assert names == ["mapstar", "worker_task_path"]
