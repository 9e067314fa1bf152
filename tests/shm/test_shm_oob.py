"""Out-of-band buffers: big frames and pickle-5 buffers through memfds, views, zero-copy send."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
from typing import Any

import pytest
from shm_helpers import join_or_kill, memfd_fds

import hyperpipe
from hyperpipe import _core
from hyperpipe._shm_transport import shm_pipe

np = pytest.importorskip("numpy")

MiB = 1 << 20


def soon(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def test_big_frame_round_trip_and_into(pair: Any, resources: Any) -> None:
    a, b = pair
    data = os.urandom(3 * MiB + 5)
    a.send_frame(memoryview(data), None)
    frame = b.recv_frame(None, soon())
    assert bytes(frame) == data
    a.send_frame(memoryview(data), None)
    buf = bytearray(len(data) + 10)
    assert b.recv_frame_into(memoryview(buf), 10, soon()) == len(data)
    assert buf[10:] == data
    a.send_frame(memoryview(data), None)
    with pytest.raises(hyperpipe.BufferTooShort) as info:
        b.recv_frame_into(memoryview(bytearray(100)), 0, soon())
    assert info.value.args[0] == data
    del frame, info
    a.send_frame(memoryview(data), None)
    with pytest.raises(hyperpipe.MessageTooLongError):
        b.recv_frame(1000, soon())  # maxlength is checked against the real size


def _random_array(nbytes: int) -> Any:
    return np.frombuffer(os.urandom(nbytes), dtype=np.uint8)


@pytest.mark.parametrize(
    "layout",
    [
        "one buffer",  # the announced last MiB starts inside the buffer
        "stream in the block",  # ... inside the pickle stream, after the buffers
        "mark in the padding",  # ... between two page-aligned buffers
    ],
)
def test_copies_over_4_mib_arrive_whole_in_every_layout(pair: Any, layout: str) -> None:
    # A copy of more than 4 MiB is made in two parts (its last MiB is announced between
    # them): every byte must land where the frame says, wherever the split falls.
    a, b = pair
    if layout == "one buffer":
        obj: Any = (_random_array(6 * MiB + 8),)
    elif layout == "stream in the block":
        obj = (_random_array(5 * MiB), os.urandom(2 * MiB))  # bytes go in the stream
    else:  # 5 MiB + 8 at 0, then 1 MiB - 2 KiB at 5 MiB + 4 KiB: the split is at 5 MiB + 2 KiB
        obj = (_random_array(5 * MiB + 8), _random_array(MiB - 2048))
    want = pickle.dumps(obj, 5)
    a.send_object(obj, None)
    got = b.recv_object(soon(), copy=False)
    assert pickle.dumps(got, 5) == want
    del got


def test_numpy_arrays_copy_true_are_ordinary(pair: Any) -> None:
    a, b = pair
    arrays = {"f": np.arange(2 * MiB // 8, dtype=np.float64), "i": np.ones((512, 1024), np.int32)}
    a.send_object({"arrays": arrays, "small": np.arange(10), "tag": "t"}, None)
    got = b.recv_object(soon())
    assert got["tag"] == "t" and (got["small"] == np.arange(10)).all()
    for key, arr in arrays.items():
        assert got["arrays"][key].dtype == arr.dtype and got["arrays"][key].shape == arr.shape
        assert (got["arrays"][key] == arr).all()
        assert got["arrays"][key].flags.writeable
    got["arrays"]["f"][:] = -1  # ours alone: the sender's array is untouched
    assert arrays["f"][5] == 5.0
    stats = b.statistics()
    assert stats["heap_received"] == 1 and stats["oob_received"] == 0  # one block, both buffers


def test_copy_false_gives_read_only_views_released_with_last_reference() -> None:
    a, b = shm_pipe(True, heap_size=4 * MiB)
    try:
        arr = np.arange(MiB // 4, dtype=np.float64)  # 2 MiB
        a.send_object(arr, None)
        view = b.recv_object(soon(), copy=False)
        assert not view.flags.writeable
        assert (view == arr).all()
        with pytest.raises(ValueError):
            view[0] = 1.0
        big = np.ones(3 * MiB // 8)
        a.send_object(big, None)  # the heap is busy with the live view: a memfd instead
        assert b.recv_object(soon()).sum() == big.sum()
        assert b.statistics()["oob_received"] == 1
        del view  # the last reference: the block goes back to the sender
        a.send_object(big, None)
        assert b.recv_object(soon()).sum() == big.sum()
        assert b.statistics()["oob_received"] == 1 and b.statistics()["heap_received"] == 2
    finally:
        a.close()
        b.close()


def test_memfd_path_views_unmapped_with_last_reference() -> None:
    import gc

    from shm_helpers import memfd_mappings

    a, b = shm_pipe(True, heap_size=0)
    try:
        arr = np.arange(MiB, dtype=np.float64)
        a.send_object(arr, None)
        view = b.recv_object(soon(), copy=False)
        assert not view.flags.writeable and (view == arr).all()
        gc.collect()
        before = memfd_mappings()
        del view
        gc.collect()
        assert memfd_mappings() == before - 1
        assert b.statistics()["oob_received"] == 1
    finally:
        a.close()
        b.close()


def test_big_pickle_stream_without_buffers(pair: Any) -> None:
    a, b = pair
    obj = {"ints": list(range(200_000)), "blob": b"b" * (2 * MiB)}
    a.send_object(obj, None)
    assert b.recv_object(soon()) == obj


def test_recv_bytes_of_an_object_sent_with_buffers_is_a_valid_pickle(pair: Any) -> None:
    a, b = pair
    arr = np.arange(MiB // 8, dtype=np.float64)
    a.send_object(arr, None)
    frame = b.recv_frame(None, soon())
    assert (pickle.loads(frame) == arr).all()


def test_allocate_buffer_zero_copy_send(pair: Any) -> None:
    a, b = pair
    buf = a.allocate_buffer(4 * MiB)
    arr = np.frombuffer(buf, dtype=np.uint8)
    arr[:] = 7
    a.send_frame(memoryview(buf).cast("B"), None)  # send_bytes(buf)
    frame = b.recv_frame(None, soon())
    assert len(frame) == 4 * MiB and frame[0] == 7 and frame[-1] == 7
    # send(obj) of an array over the whole shared buffer: the same pages go across
    shared = np.frombuffer(buf, dtype=np.float64)
    shared[:] = 1.5
    a.send_object(shared, None)
    view = b.recv_object(soon(), copy=False)
    shared[0] = 99.0  # the sender still writes to the pages: a view sees it (no copy made)
    assert view[0] == 99.0 and view[1] == 1.5
    a.send_object(shared, None)
    private = b.recv_object(soon())  # copy=True: a private copy, independent of the sender
    shared[1] = 42.0
    assert private[1] == 1.5 and private[0] == 99.0 and private.flags.writeable
    assert a.allocate_buffer(0) == bytearray()


def _address(buf: Any) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def test_allocate_buffer_comes_from_the_pipes_heap(pair: Any) -> None:
    # No memfd, no mapping per message: a block of the heap both sides have mapped.
    a, b = pair
    memfds = memfd_fds()
    buf = a.allocate_buffer(MiB)
    np.frombuffer(buf, dtype=np.uint8)[:] = 3
    a.send_frame(memoryview(buf), None)
    frame = b.recv_frame(None, soon())
    assert memfd_fds() == memfds
    assert len(frame) == MiB and frame[0] == 3 and frame.readonly
    assert a.statistics()["heap_sent"] == 1 and b.statistics()["heap_received"] == 1
    del frame, buf


def test_a_full_heap_sends_through_a_memfd_and_is_used_again_once_free() -> None:
    a, b = shm_pipe(True, heap_size=2 * MiB)
    try:
        arr = np.arange(MiB // 8, dtype=np.float64)
        a.send_object(arr, None)
        held = b.recv_object(soon(), copy=False)  # keeps its block: the heap has no room left
        a.send_object(arr + 1, None)
        a.send_frame(memoryview(bytes(3 * MiB)), None)  # bigger than the heap
        assert (b.recv_object(soon(), copy=False) == arr + 1).all()
        assert len(b.recv_frame(None, soon())) == 3 * MiB
        assert a.statistics()["heap_sent"] == 1 and a.statistics()["oob_sent"] == 2
        del held
        a.send_object(arr + 2, None)
        assert (b.recv_object(soon(), copy=False) == arr + 2).all()
        assert a.statistics()["heap_sent"] == 2 and b.statistics()["heap_received"] == 2
    finally:
        a.close()
        b.close()


def test_every_copied_buffer_lands_on_a_page(pair: Any) -> None:
    # Whatever the copy (memcpy, or non-temporal stores from copy_stream_min up), a buffer's
    # data starts on a page of the block, as numpy likes it.
    a, b = pair
    for n in (MiB, 3 * MiB + 5):
        arr = np.ones(n + 16, dtype=np.uint8)[16:]  # a source 16 bytes into a page, or so
        arr[-1] = 7
        a.send_object(arr, None)
        view = b.recv_object(soon(), copy=False)
        assert view.shape == (n,) and view[0] == 1 and view[-1] == 7
        assert view.ctypes.data % 4096 == 0
        del view, arr


def test_a_streamed_copy_is_exact_at_every_alignment() -> None:
    # The non-temporal copy does the bytes up to the destination's next 64-byte line and the
    # tail with memcpy, the rest in 128-byte strides: every split of a buffer must be exact.
    src = os.urandom(4096 + 300)
    for dst_off in (0, 1, 31, 32, 63, 64, 100):
        for src_off in (0, 1, 17, 64):
            for n in (0, 1, 63, 64, 127, 128, 129, 255, 256, 1000, 4096 + 5):
                dst = bytearray(b"\xee" * (dst_off + n + 64))
                _core._copy_stream(memoryview(dst)[dst_off:], memoryview(src)[src_off : src_off + n])
                assert dst[dst_off : dst_off + n] == src[src_off : src_off + n], (dst_off, src_off, n)
                assert dst[:dst_off] == b"\xee" * dst_off and dst[dst_off + n :] == b"\xee" * 64


@pytest.mark.parametrize("where", ["heap", "memfd"])
@pytest.mark.parametrize("layout", ["one buffer", "stream in the block", "two buffers"])
def test_streamed_copies_arrive_whole_in_every_layout(layout: str, where: str) -> None:
    # From copy_stream_min bytes up a buffer is copied with non-temporal stores (into the
    # heap its last MiB announced in between): arrays of that size arrive whole, from a
    # source that does not start on a line, in every layout, and again when the block is
    # reused; through a memfd too (no heap).
    big = _core.copy_stream_min()
    if big > 256 * MiB:
        pytest.skip("buffers stream only from more than 256 MiB here (or never): too big to send in a test")
    a, b = shm_pipe(True) if where == "heap" else shm_pipe(True, heap_size=0)
    try:
        for rep in range(2):
            first = np.frombuffer(np.random.default_rng(rep).bytes(big + 21), dtype=np.uint8)[3:]
            if layout == "one buffer":  # an array that owns its memory: sent as it is
                obj: Any = (first.copy(),)
            elif layout == "stream in the block":
                obj = (first, bytes(range(256)) * 4096)  # 1 MiB of bytes in the stream
            else:
                obj = (first[: big // 2 + 5], first)
            a.send_object(obj, None)
            got = b.recv_object(soon(), copy=False)
            assert len(got) == len(obj)
            for g, w in zip(got, obj):
                assert type(g) is type(w) and np.asarray(g).shape == np.asarray(w).shape
                assert g.tobytes() == w.tobytes() if isinstance(w, np.ndarray) else g == w
            del got
    finally:
        a.close()
        b.close()


def test_a_copy_that_was_not_sent_gives_its_block_back() -> None:
    a, b = shm_pipe(True, heap_size=2 * MiB)
    b.close()
    try:
        for _ in range(3):  # each would hold 1 MiB of the 2 if its block were kept
            with pytest.raises((BrokenPipeError, EOFError, OSError)):
                a.send_object(np.zeros(MiB // 8), soon())
        block = a.allocate_buffer(MiB + MiB // 2)
        assert type(block) is memoryview and type(block.obj).__name__ == "HeapBlock"  # not a memfd
        del block
    finally:
        a.close()


@pytest.mark.parametrize("first_to_let_go", ["sender", "receiver"])
def test_a_shared_heap_block_is_reused_only_once_both_sides_let_go(first_to_let_go: str) -> None:
    a, b = shm_pipe(True)
    try:
        buf = a.allocate_buffer(MiB)
        address = _address(buf)
        arr = np.frombuffer(buf, dtype=np.float64)
        arr[:] = 2.0
        a.send_object(arr, None)
        view = b.recv_object(soon(), copy=False)
        assert view[0] == 2.0
        if first_to_let_go == "sender":
            del arr, buf
        else:
            del view
        other = a.allocate_buffer(MiB)
        assert _address(other) != address  # the other side still holds the block
        if first_to_let_go == "sender":
            assert view[-1] == 2.0
            del view
        else:
            del arr, buf
        del other
        again = a.allocate_buffer(MiB)
        assert _address(again) == address  # first fit: freed by whoever let go last
        del again
    finally:
        a.close()
        b.close()


def test_parts_of_a_shared_buffer_and_other_pipes(pair: Any) -> None:
    a, b = pair
    buf = a.allocate_buffer(2 * MiB)
    arr = np.frombuffer(buf, dtype=np.float64)
    arr[:] = np.arange(len(arr))
    # send(obj) of a slice: the same pages go, at their offset in the block
    a.send_object(arr[1000:], None)
    part = b.recv_object(soon(), copy=False)
    arr[1000] = -1.0
    assert part[0] == -1.0 and part[-1] == len(arr) - 1 and len(part) == len(arr) - 1000
    # send_bytes of a part that does not start the block: the same pages go too
    a.send_frame(memoryview(buf)[8:], None)
    frame = b.recv_frame(None, soon())
    assert bytes(frame[:8]) == np.float64(1.0).tobytes() and len(frame) == 2 * MiB - 8
    arr[1] = 7.0
    assert bytes(frame[:8]) == np.float64(7.0).tobytes()
    # another pipe cannot refer to this pipe's heap: it copies
    c, d = shm_pipe(True)
    try:
        c.send_object(arr, None)
        copied = d.recv_object(soon(), copy=False)
        arr[1] = 42.0
        assert copied[1] == 7.0 and copied[1000] == -1.0
        del copied
    finally:
        c.close()
        d.close()
    del part, frame, arr, buf


@pytest.mark.parametrize("heap_size", [0, 8 * MiB])
def test_maxlength_sees_the_exact_size_of_a_big_message(heap_size: int) -> None:
    a, b = shm_pipe(True, heap_size=heap_size)
    try:
        size = 3 * MiB + 5  # not a whole number of pages
        for _ in range(2):
            a.send_frame(memoryview(bytes(size)), None)
        with pytest.raises(hyperpipe.MessageTooLongError):
            b.recv_frame(size - 1, soon())
        assert len(b.recv_frame(size, soon())) == size
    finally:
        a.close()
        b.close()


def test_more_buffers_than_a_frame_has_spans_for() -> None:
    # A 4 KiB ring has room for the spans of ~120 buffers: the rest go in band.
    a, b = shm_pipe(True, ring_size=4096)
    try:
        buffers = [pickle.PickleBuffer(bytearray([i % 251]) * 8192) for i in range(300)]
        a.send_object(buffers, soon())
        got = b.recv_object(soon())
        assert [bytes(g) for g in got] == [bytes(buf.raw()) for buf in buffers]
    finally:
        a.close()
        b.close()


def test_bytes_in_flight_balance_for_parts_of_a_shared_block() -> None:
    # The frame of a slice of an allocate_buffer block counts what the receiver uncounts.
    a, b = shm_pipe(True, max_inflight_bytes=4 * MiB)
    try:
        arr = np.frombuffer(a.allocate_buffer(2 * MiB), dtype=np.uint8)
        for _ in range(20):
            a.send_object(arr[4096 : 4096 + MiB], soon(10))
            assert len(b.recv_object(soon(), copy=False)) == MiB
        for _ in range(3):  # 3 MiB in flight, under the cap: none waits for the reader
            a.send_frame(memoryview(bytes(MiB)), time.monotonic() + 5)
        assert [len(b.recv_frame(None, soon())) for _ in range(3)] == [MiB] * 3
        del arr
    finally:
        a.close()
        b.close()


class _Payload:
    def __init__(self, data: bytes) -> None:
        self.data = data


def test_the_sender_keeps_nothing_of_what_it_sent(pair: Any) -> None:
    # The pickler is reused between sends; its memo must not keep the last object alive
    # (a 256 MiB array the caller dropped would stay in memory until the next send).
    import weakref

    a, b = pair
    arr = np.ones(MiB, dtype=np.uint8)
    obj = _Payload(b"x" * 100)
    refs = [weakref.ref(arr), weakref.ref(obj)]
    a.send_object(arr, None)
    a.send_object(obj, None)
    assert b.recv_object(soon())[0] == 1 and b.recv_object(soon()).data == obj.data
    del arr, obj
    assert [r() for r in refs] == [None, None]


def _drop_inherited(buf: Any) -> None:
    del buf  # a forked copy must not free the parent's block


def test_a_forked_child_dropping_a_shared_buffer_frees_nothing(pair: Any) -> None:
    a, b = pair
    buf = a.allocate_buffer(MiB)
    address = _address(buf)
    child = multiprocessing.get_context("fork").Process(target=_drop_inherited, args=(buf,))
    child.start()
    assert join_or_kill(child) == 0
    other = a.allocate_buffer(MiB)
    assert _address(other) != address
    np.frombuffer(buf, dtype=np.uint8)[:] = 9
    a.send_frame(memoryview(buf), None)
    assert b.recv_frame(None, soon())[-1] == 9
    del other, buf


def test_inflight_cap_blocks_until_deadline_then_resumes() -> None:
    reader, writer = shm_pipe(False, max_inflight_fds=2, max_inflight_bytes=8 * MiB, heap_size=0)
    try:
        big = memoryview(b"c" * (3 * MiB))
        writer.send_frame(big, soon())
        writer.send_frame(big, soon())  # 6 MiB in flight: under the byte cap, at the fd cap
        with pytest.raises(hyperpipe.TimeoutError):
            writer.send_frame(big, time.monotonic() + 0.1)
        assert bytes(reader.recv_frame(None, soon())) == bytes(big)
        writer.send_frame(big, soon())  # room again
        assert bytes(reader.recv_frame(None, soon())) == bytes(big)
        assert bytes(reader.recv_frame(None, soon())) == bytes(big)
        assert not reader.poll(0)  # the refused one left nothing behind
    finally:
        reader.close()
        writer.close()


def test_one_message_above_the_byte_cap_still_goes() -> None:
    reader, writer = shm_pipe(False, max_inflight_bytes=MiB, heap_size=0)
    try:
        writer.send_frame(memoryview(b"d" * (4 * MiB)), soon())
        assert len(reader.recv_frame(None, soon())) == 4 * MiB
    finally:
        reader.close()
        writer.close()


@pytest.mark.parametrize("heap_size", [0, 8 * MiB])
def test_no_leaks_after_many_oob_messages(resources: Any, heap_size: int) -> None:
    a, b = shm_pipe(True, heap_size=heap_size)
    arr = np.arange(MiB // 8, dtype=np.float64)
    for i in range(50):
        a.send_object(arr, None)
        a.send_frame(memoryview(b"e" * (MiB + i)), None)
        assert (b.recv_object(soon()) == arr).all()
        assert len(b.recv_frame(None, soon())) == MiB + i
    for _ in range(5):  # unread ones die with the ends
        a.send_object(arr, None)
    a.close()
    b.close()
    resources.assert_released()


def _cross_sender(reduced: tuple, nbytes: int) -> None:
    rebuild, args = reduced
    t = rebuild(*args)
    payload = np.full(nbytes // 8, 2.0)
    t.send_object(payload, soon(120))  # before receiving anything
    got = t.recv_object(soon(120))
    t.send_object(float(got.sum()), soon(120))
    t.close()


def test_no_deadlock_when_both_send_200_mib_first() -> None:
    nbytes = 200 * MiB
    a, b = shm_pipe(True)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_cross_sender, args=(b.reduce(), nbytes))
    p.start()
    b.close()
    code = None
    try:
        a.send_object(np.full(nbytes // 8, 1.0), soon(120))  # both sending at once
        got = a.recv_object(soon(120))
        assert got.shape == (nbytes // 8,) and got[0] == 2.0 and got[-1] == 2.0
        assert a.recv_object(soon(120)) == float(nbytes // 8)
    finally:
        code = join_or_kill(p, 120)
        a.close()
    assert code == 0


def _echo_array(reduced: tuple) -> None:
    rebuild, args = reduced
    t = rebuild(*args)
    arr = t.recv_object(soon())
    arr *= 2  # ours: writable
    t.send_object(arr, soon())
    t.send_frame(memoryview(b"blob" * (MiB // 4)), soon())


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_big_buffers_through_an_end_passed_to_a_child(method: str) -> None:
    a, b = shm_pipe(True)
    ctx = multiprocessing.get_context(method)
    p = ctx.Process(target=_echo_array, args=(b.reduce(),))
    p.start()
    b.close()
    try:
        arr = np.arange(MiB // 4, dtype=np.float64)  # 2 MiB: through the heap
        a.send_object(arr, soon())
        back = a.recv_object(soon())
        assert (back == arr * 2).all()
        assert bytes(a.recv_frame(None, soon())) == b"blob" * (MiB // 4)
        assert a.statistics()["heap_received"] == 2
    finally:
        assert join_or_kill(p) == 0
        a.close()
