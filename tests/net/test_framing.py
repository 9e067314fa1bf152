"""``_framing``, the sans-IO frame reader and writers: every frame kind, cut at every byte."""

from __future__ import annotations

import pickle
import struct
from typing import Any

import pytest

import hyperpipe
from hyperpipe import _framing


class Blob:
    def __init__(self, data: Any) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: int) -> Any:
        return Blob, (pickle.PickleBuffer(self.data),)


def _wire(views: list) -> bytes:
    return b"".join(bytes(v) for v in views)


def _frames() -> dict[str, tuple[bytes, Any]]:
    """name -> (bytes on the wire, what the reader must return, normalised)."""
    small = b"hello"
    long = b"L" * 300
    message = ("x", Blob(bytearray(b"B" * 70_000)), Blob(bytearray(b"")))
    stream, buffers = _framing.dumps_oob(message)
    return {
        "empty": (_wire(_framing.frame_views(b"")), b""),
        "small": (_wire(_framing.frame_views(small)), small),
        # the stdlib's long form is legal for any size
        "long-form": (struct.pack("!iQ", -1, len(long)) + long, long),
        "joined-limit": (_wire(_framing.frame_views(b"j" * 20_000)), b"j" * 20_000),
        "oob": (_wire(_framing.oob_views(stream, buffers)), ("oob", bytes(stream), [70_000])),
    }


def _normalise(frame: Any) -> Any:
    if isinstance(frame, _framing.OobFrame):
        return ("oob", bytes(frame.stream), [len(b) for b in frame.buffers])
    return bytes(frame)


@pytest.mark.parametrize("name", list(_frames()))
def test_every_cut_gives_the_same_frame(name: str) -> None:
    wire, expected = _frames()[name]
    if len(wire) < 400:
        cuts: Any = range(len(wire) + 1)
    else:  # every cut in the headers and at the end
        cuts = [*range(40), *range(len(wire) - 40, len(wire) + 1)]
    for cut in cuts:
        reader = _framing.FrameReader()
        first = reader.feed(wire[:cut])
        if cut < len(wire):
            assert first is None
            assert reader.in_frame is (cut > 0)
            frame = reader.feed(wire[cut:])
        else:
            frame = first
        assert _normalise(frame) == expected, f"cut at {cut}"
        assert not reader.in_frame


def test_out_of_band_frame_unpickles_on_its_buffers() -> None:
    data = bytearray(range(256)) * 300
    stream, buffers = _framing.dumps_oob(Blob(data))
    assert [b.nbytes for b in buffers] == [len(data)]
    frame = _framing.FrameReader().feed(_wire(_framing.oob_views(stream, buffers)))
    assert bytes(frame.loads().data) == bytes(data)
    assert pickle.loads(frame.in_band()).data == data  # the bytes a stdlib reader could load


def test_small_buffers_stay_in_band() -> None:
    stream, buffers = _framing.dumps_oob(Blob(bytearray(100)))
    assert buffers == []
    assert pickle.loads(stream).data == bytearray(100)


def test_dumps_is_the_forking_picklers_output() -> None:
    from multiprocessing.reduction import ForkingPickler

    for obj in [(42, "hello", 3.14), b"x", None, [1, 2.0, "3"], {"a": 1}, ((1,),)]:
        assert bytes(_framing.dumps(obj)) == bytes(ForkingPickler.dumps(obj))


@pytest.mark.parametrize(
    "wire, error",
    [
        (struct.pack("!i", -3), hyperpipe.ProtocolError),
        (struct.pack("!iQ", -1, 2**63), hyperpipe.MessageTooLongError),  # over maxlength first, as the stdlib
        (struct.pack("!i", 11), hyperpipe.MessageTooLongError),
    ],
    ids=["negative-length", "long-length-over-2**63", "over-maxlength"],
)
def test_bad_headers(wire: bytes, error: type) -> None:
    reader = _framing.FrameReader()
    reader.maxlength = 10
    with pytest.raises(error):
        reader.feed(wire)


def test_a_length_over_2_63_is_corrupt_without_maxlength() -> None:
    with pytest.raises(hyperpipe.ProtocolError, match="corrupt frame header"):
        _framing.FrameReader().feed(struct.pack("!iQ", -1, 2**63))


def test_out_of_band_frames_can_be_refused() -> None:
    reader = _framing.FrameReader(oob=False)
    with pytest.raises(hyperpipe.ProtocolError):
        reader.feed(struct.pack("!i", _framing.OOB_MARK))


def test_a_big_part_is_reserved_not_committed() -> None:
    """Above EAGER_ALLOC a part is an anonymous mapping: a hostile length costs address
    space, and pages only as bytes arrive."""
    reader = _framing.FrameReader()
    size = 4 * _framing.EAGER_ALLOC
    assert reader.feed(struct.pack("!iQ", -1, size)) is None
    target = reader.target()
    assert len(target) == size
    assert not isinstance(target.obj, bytearray)
