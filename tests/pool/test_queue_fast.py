"""A Queue's item path in one C call (``_core.QueueFast``) and its C pickling of plain items
(``_core._queue_encode`` / ``_queue_decode``): every item comes out as ``pickle`` gives it
(value, types and shared references alike), each case the C path leaves to the Python path
still works, and a fork gets a new ``QueueFast``."""

from __future__ import annotations

import collections
import enum
import gc
import os
import pickle
import random

import pytest

import hyperpipe
from hyperpipe import _core, _queues

import pool_support as support
from pool_support import TIMEOUT, Empty

Point = collections.namedtuple("Point", "x y")


class Colour(enum.IntEnum):
    RED = 1


class Text(str):
    pass


def _shape(obj, seen=None):
    """``obj`` as nested types and values, with each string or container that occurs more
    than once named by where it first occurred (pickle keeps such sharing)."""
    seen = {} if seen is None else seen
    if isinstance(obj, (str, bytes, tuple, list, dict)) and obj != ():
        if id(obj) in seen:
            return ("same as", seen[id(obj)])
        seen[id(obj)] = len(seen)
    if type(obj) in (tuple, list):
        return (type(obj).__name__, [_shape(x, seen) for x in obj])
    if type(obj) is dict:
        return ("dict", [(_shape(k, seen), _shape(v, seen)) for k, v in obj.items()])
    if type(obj) is float and obj != obj:
        return ("float", "nan")
    return (type(obj).__name__, repr(obj))


def _shared():
    s, inner = "shared", [1, 2]
    return [(s, s), [inner, inner], [{"k": 1}, {"k": 2}], ((1, 2),) * 3]


def _recursive_list():
    items = [1]
    items.append(items)
    return items


PLAIN = [
    None, True, False, 0, 255, 256, 65535, 65536, -1, 2**31 - 1, -(2**31), 2**31, 2**63 - 1, -(2**63),
    0.0, -0.0, 1.5, float("inf"), float("nan"), "", "abc", "x" * 255, "x" * 256, b"", b"yz",
    b"y" * 300, (), (1,), (1, 2), (1, 2, 3), tuple(range(10)), [], [1, [2, [3]]], {}, {"a": 1, 2: (3,)},
    (3, 12345), ("task", 7, {"args": [1.0, None], "ok": True}), *_shared(), _recursive_list(),
]


def _too_deep():
    item = 0
    for _ in range(17):
        item = (item,)
    return item


def _tuple_inside_itself():
    t = ([],)
    t[0].append(t)
    return t


NOT_PLAIN = [
    2**63, -(2**63) - 1, "é", Point(1, 2), Colour.RED, Text("a"), (Text("a"),), collections.OrderedDict(),
    {1, 2}, bytearray(b"x"), object, _too_deep(), b"z" * 5000, [str(i) for i in range(65)],
    _tuple_inside_itself(), ([Point(1, 2)],),
]


@pytest.mark.parametrize("item", PLAIN, ids=range(len(PLAIN)))
def test_a_plain_item_is_pickled_in_c_as_pickle_reads_it(item):
    data = _core._queue_encode(item)
    assert data is not None
    expected = _shape(pickle.loads(pickle.dumps(item, 5)))
    assert _shape(pickle.loads(data)) == expected
    decoded, read = _core._queue_decode(data)
    assert read
    assert _shape(decoded) == expected


@pytest.mark.parametrize("item", NOT_PLAIN, ids=range(len(NOT_PLAIN)))
def test_other_items_are_left_to_the_pickler(item):
    assert _core._queue_encode(item) is None


@pytest.mark.parametrize("item", PLAIN, ids=range(len(PLAIN)))
def test_the_pickler_s_pickle_of_a_plain_item_is_read_in_c_too(item):
    # what the feeder thread sends: FRAME, and APPEND / SETITEM for one item
    data = pickle.dumps(item, 5)
    decoded, read = _core._queue_decode(data)
    assert read
    assert _shape(decoded) == _shape(pickle.loads(data))


def test_the_decoder_reads_only_what_pickle_reads_the_same():
    """Every truncation and random corruption of plain pickles: either the decoder reads it
    and pickle.loads gives the same, or it leaves it to pickle.loads (whatever that does)."""
    rng = random.Random(5)
    samples = [_core._queue_encode(item) for item in PLAIN] + [pickle.dumps(item, 5) for item in PLAIN]
    cases = [data[:n] for data in samples for n in range(len(data))]
    for _ in range(3000):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            if rng.random() < 0.5:
                data[at] = rng.randrange(256)
            else:
                data.insert(at, rng.choice(b"NKMJG\x8a\x8cCXB)]}\x85\x86\x87(teuas.\x94\x95h\x88"))
        cases.append(bytes(data))
    read = 0
    for data in cases:
        decoded, ok = _core._queue_decode(data)
        if ok:
            read += 1
            assert _shape(decoded) == _shape(pickle.loads(data)), data
        else:
            assert decoded is None
    assert read > 100  # the corruptions that stay well-formed were read


def _fast_queue(**kwargs):
    q = hyperpipe.get_context("fork").Queue(**kwargs)
    q.put(None)
    assert q.get(timeout=TIMEOUT) is None
    assert isinstance(q._hp_fast, _core.QueueFast)  # the C path is the one under test
    return q


def test_every_kind_of_item_through_the_c_path_and_its_fallbacks(capsys):
    q = _fast_queue()
    big = b"b" * 70_000  # a pickle bigger than a ring frame: the Python path sends it
    items = [*PLAIN, *NOT_PLAIN[:-4], b"m" * 5000, big, support.unpicklable(), ("after",)]
    try:
        for item in items:
            q.put(item)
        got = [q.get(timeout=TIMEOUT) for _ in range(len(items) - 1)]
        with pytest.raises(Empty):
            q.get(timeout=0.05)
    finally:
        q.close()
        q.join_thread()
    sent = [item for item in items if item is not items[-2]]  # the unpicklable one dropped
    assert [_shape(x) for x in got] == [_shape(x) for x in sent]
    assert "Traceback" in capsys.readouterr().err  # reported as the stdlib's feeder does


def test_an_array_goes_out_of_band_through_the_python_path():
    np = pytest.importorskip("numpy")
    q = _fast_queue()
    array = np.arange(1 << 14, dtype=np.float64)  # 128 KiB
    assert _core._queue_encode(("array", array)) is None
    try:
        q.put(("array", array))
        tag, got = q.get(timeout=TIMEOUT)
        assert tag == "array" and np.array_equal(got, array)
    finally:
        q.close()
        q.join_thread()


def test_get_s_block_and_timeout():
    q = _fast_queue()
    try:
        with pytest.raises(Empty):
            q.get(False)
        with pytest.raises(Empty):
            q.get(True, 0.01)
        with pytest.raises(Empty):
            q.get(True, -1)
        q.put(1)
        q.put(2)
        assert q.get(False) == 1  # sent at once: in the ring already
        assert q.get(True, TIMEOUT) == 2
        assert q.qsize() == 0
    finally:
        q.close()
        q.join_thread()


def test_a_full_ring_hands_the_items_to_the_feeder_in_order():
    q = _fast_queue()
    count = 400  # 400 x 2 KiB: more than the 256 KiB ring
    try:
        for i in range(count):
            q.put((i, b"f" * 2048))
        assert q._thread is not None  # the ring filled: the feeder holds the rest
        got = [q.get(timeout=TIMEOUT)[0] for _ in range(count)]
    finally:
        q.close()
        q.join_thread()
    assert got == list(range(count))


def test_the_feeder_sends_plain_items_in_c_and_the_others_the_python_way(monkeypatch, capsys):
    q = _fast_queue()
    python_sends = []
    send = _queues._ItemSender.send
    monkeypatch.setattr(_queues._ItemSender, "send", lambda self, obj, deadline: (
        python_sends.append(obj), send(self, obj, deadline))[1])
    fill = [(i, b"f" * 2048) for i in range(200)]  # more than the ring: the rest to the feeder
    others = [Point(1, 2), support.unpicklable(), b"b" * 70_000, "é"]
    items = fill + others + [("plain", i) for i in range(100)]
    try:
        for item in items:
            q.put(item)
        assert q._thread is not None
        got = [q.get(timeout=TIMEOUT) for _ in range(len(items) - 1)]
    finally:
        q.close()
        q.join_thread()
    assert got == [item for item in items if item is not others[1]]
    assert "Traceback" in capsys.readouterr().err  # the unpicklable one, reported
    # the feeder's Python sends from the first of them on: only them (every plain item
    # after them went out in C)
    assert python_sends[python_sends.index(others[0]):] == others


def test_a_bounded_queue_blocks_and_raises_full():
    q = _fast_queue(maxsize=2)
    try:
        q.put(1)
        q.put(2)
        with pytest.raises(support.Full):
            q.put(3, timeout=0.05)
        with pytest.raises(support.Full):
            q.put_nowait(3)
        assert [q.get(timeout=TIMEOUT), q.get(timeout=TIMEOUT)] == [1, 2]
        q.put(3)
        assert q.get(timeout=TIMEOUT) == 3
    finally:
        q.close()
        q.join_thread()


def test_a_bounded_queue_with_items_waiting_for_the_feeder_raises_full():
    q = _fast_queue(maxsize=300)
    try:
        for i in range(300):  # 300 x 2 KiB: the ring fills, the rest waits for the feeder
            q.put((i, b"f" * 2048))
        assert q._buffer  # what put() sees next: items of this process still waiting
        with pytest.raises(support.Full):
            q.put("one more", timeout=0.05)
        assert q.get(timeout=TIMEOUT)[0] == 0
        q.put("one more", timeout=TIMEOUT)  # its place freed: it goes after the waiting ones
        got = [q.get(timeout=TIMEOUT) for _ in range(300)]
    finally:
        q.close()
        q.join_thread()
    assert [item[0] for item in got[:-1]] == list(range(1, 300)) and got[-1] == "one more"


def _after_fork(q, results):
    inherited = q._hp_fast
    results.put(("stale", inherited.stale))
    q.put(("child", os.getpid()))
    results.put(("item", q.get(timeout=TIMEOUT)[0]))
    results.put(("new", q._hp_fast is not inherited and not q._hp_fast.stale))


def test_a_forked_child_builds_its_own(procs):
    ctx = hyperpipe.get_context("fork")
    q = _fast_queue()
    results = ctx.SimpleQueue()
    p = procs.start(ctx, _after_fork, q, results)
    got = dict(results.get() for _ in range(3))
    p.join(TIMEOUT)
    assert not q._hp_fast.stale  # the parent's own stays
    q.close()
    q.join_thread()
    assert got == {"stale": True, "item": "child", "new": True}


def test_a_queue_over_the_socket_transport_has_none():
    ctx = hyperpipe.get_context("fork")
    q = ctx.Queue()
    q._reader.close()
    q._writer.close()
    q._reader, q._writer = hyperpipe.Pipe(duplex=False, transport="socket")
    try:
        q.put((1, "a"))
        assert q.get(timeout=TIMEOUT) == (1, "a")
        assert q._hp_fast is None
    finally:
        q.close()
        q.join_thread()


def test_the_c_path_keeps_nothing_of_an_item_alive():
    q = _fast_queue()
    try:
        for item in ([1, 2], (Point(1, 2),)):  # the C pickling and the pickler
            gc.collect()
            before = len(gc.get_objects())
            for _ in range(200):
                q.put(item)
                q.get(timeout=TIMEOUT)
            gc.collect()
            assert len(gc.get_objects()) - before < 50
    finally:
        q.close()
        q.join_thread()
