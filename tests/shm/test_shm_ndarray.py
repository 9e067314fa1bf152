"""Big plain numpy arrays sent with ``send`` travel as an array description (FLAG_NDARRAY)
instead of a pickle: the receiver must get exactly what pickle would have made."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from hyperpipe import _shm_transport, errors
from hyperpipe._shm_transport import FLAG_NDARRAY, _array_from, _array_stream, shm_pipe

np = pytest.importorskip("numpy")

MiB = 1 << 20


def plain_arrays() -> list:
    return [
        np.arange(MiB // 8, dtype=np.float64),
        np.arange(300_000, dtype=">i4").reshape(300, 1000),  # not the native byte order
        np.asfortranarray(np.arange(90_000, dtype=np.float32).reshape(300, 300)),
        np.zeros((4, 5, 6, 700), dtype=np.complex64),
        np.ones(70_000, dtype=bool),
        np.arange(10 * 8192, dtype=np.uint8).reshape(10, 8192),
    ]


def pickled(arr: Any, copy: bool) -> Any:
    """What the pickle path (protocol 5, out-of-band buffers) gives the receiver."""
    buffers: list = []
    stream = pickle.dumps(arr, 5, buffer_callback=buffers.append)
    views = [memoryview(b.raw()) if copy else b.raw().toreadonly() for b in buffers]
    return pickle.loads(stream, buffers=[memoryview(bytearray(v)) if copy else v for v in views])


def same_array(got: Any, want: Any) -> None:
    assert type(got) is type(want) is np.ndarray
    assert got.dtype == want.dtype and got.dtype.str == want.dtype.str
    assert got.shape == want.shape and got.strides == want.strides
    assert got.flags.c_contiguous == want.flags.c_contiguous
    assert got.flags.f_contiguous == want.flags.f_contiguous
    assert got.flags.writeable == want.flags.writeable
    assert (got == want).all()


@pytest.mark.parametrize("heap_size", [1 << 30, 0])  # heap block, or a memfd per message
@pytest.mark.parametrize("copy", [True, False])
def test_plain_arrays_arrive_as_pickle_would_make_them(heap_size: int, copy: bool) -> None:
    a, b = shm_pipe(True, heap_size=heap_size)
    try:
        for arr in plain_arrays():
            assert _array_stream(arr) is not None
            a.send_object(arr, None)
            same_array(b.recv_object(None, copy), pickled(arr, copy))
    finally:
        a.close()
        b.close()


def test_the_frame_says_array_and_carries_no_pickle(pair: Any) -> None:
    a, b = pair
    arr = np.arange(MiB // 8, dtype=np.float64)
    a.send_object(arr, None)
    kind, flags, payload, fds = b._ep.recv(None, None)
    assert flags & FLAG_NDARRAY and fds == []
    assert b"numpy" not in payload and b"\x80\x05" not in payload


def test_other_arrays_and_objects_still_go_as_pickles(pair: Any) -> None:
    a, b = pair
    others = [
        np.zeros(20_000, dtype=[("x", "f8"), ("y", "i4")]),  # structured
        np.array([object()] * 10_000, dtype=object),
        np.arange(MiB // 4, dtype=np.float64)[::2],  # not contiguous
        np.arange(MiB // 8, dtype=np.float64).view(np.recarray),  # a subclass
        np.arange(MiB // 8).astype("M8[ns]"),  # dates: sent by pickle
    ]
    for arr in others:
        assert type(arr) is not np.ndarray or _array_stream(arr) is None
        a.send_object(arr, None)
        got = b.recv_object(None)
        assert type(got) is type(arr) and got.dtype == arr.dtype and got.shape == arr.shape
        if arr.dtype != object:
            assert (got == arr).all()


def test_remembered_descriptions_tell_equal_dtypes_apart(pair: Any) -> None:
    # Arrays that own their memory in C order are described from a cache keyed by the
    # dtype object: a dtype equal to a cached one but carrying metadata (which only a
    # pickle carries) must not be taken for it, nor one of the other byte order.
    a, b = pair
    plain = np.ones(MiB // 8, dtype=np.float64)
    tagged = np.ones(MiB // 8, dtype=np.dtype(np.float64, metadata={"unit": "m"}))
    swapped = np.ones(MiB // 8, dtype=">f8")
    assert tagged.dtype == plain.dtype and tagged.base is None and swapped.base is None
    for arr in (plain, tagged, swapped, plain, tagged):
        a.send_object(arr, None)
        got = b.recv_object(None)
        same_array(got, pickled(arr, True))
        assert got.dtype.metadata == arr.dtype.metadata
    for n in range(100):  # as many shapes: the cache stays bounded, the arrays right
        arr = np.full(8192 + n, n, dtype=np.float64)
        a.send_object(arr, None)
        same_array(b.recv_object(None), arr)
    assert len(_shm_transport._sent_descriptions) <= 64


def test_shared_buffer_arrays_and_recv_bytes(pair: Any) -> None:
    a, b = pair
    buf = a.allocate_buffer(MiB)
    arr = np.frombuffer(buf, dtype=np.float64)
    arr[:] = 7
    a.send_object(arr, None)
    view = b.recv_object(None, False)  # the same pages, read-only
    arr[0] = 8
    assert view[0] == 8 and not view.flags.writeable
    a.send_object(arr, None)
    private = b.recv_object(None, True)  # the sender keeps writing: a copy
    arr[1] = 9
    assert private[1] == 7 and private.flags.writeable
    a.send_object(np.arange(MiB // 8, dtype=np.float64), None)
    again = pickle.loads(b.recv_frame(None, None))  # recv_bytes of it: an in-band pickle
    assert (again == np.arange(MiB // 8, dtype=np.float64)).all()
    del view, private


@pytest.mark.parametrize(
    "stream",
    [
        b"",  # too short
        b"C\x01\x03\x00",  # no shape
        b"X\x01\x03\x00" + (10).to_bytes(8, "little") + b"<f8",  # bad order
        b"C\x01\x09\x00" + (10).to_bytes(8, "little") + b"<f8",  # wrong code length
        b"C\x01\x03\x00" + (10).to_bytes(8, "little") + b"|O8",  # objects: never this way
        b"C\x01\x03\x00" + (10).to_bytes(8, "little") + b"zz!",  # no such dtype
        b"C\x01\x03\x00" + (10).to_bytes(8, "little") + b"\xff\xfe8",  # not ASCII
    ],
)
def test_a_corrupt_description_is_a_protocol_error(stream: bytes) -> None:
    with pytest.raises(errors.ProtocolError):
        _array_from(memoryview(stream), [memoryview(bytearray(80))])


def test_a_description_that_does_not_fit_its_buffer_raises() -> None:
    good = _array_stream(np.zeros(10, dtype=np.float64))
    assert good is not None
    with pytest.raises(ValueError):  # numpy's own error, as with a pickle of garbage
        _array_from(memoryview(good), [memoryview(bytearray(81))])
    with pytest.raises(errors.ProtocolError):
        _array_from(memoryview(good), [memoryview(bytearray(80))] * 2)
    assert len(_shm_transport._array_descriptions) <= 64


def test_descriptions_a_peer_makes_up_do_not_grow_the_cache_without_end() -> None:
    for n in range(1, 200):
        stream = _array_stream(np.zeros(n, dtype=np.uint8))
        assert stream is not None
        assert _array_from(stream, [memoryview(bytearray(n))]).shape == (n,)
    assert len(_shm_transport._array_descriptions) <= 64
