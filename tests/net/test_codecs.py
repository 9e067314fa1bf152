"""Codecs: round trips, refusal of what they cannot carry, and garbage from a peer."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from hyperpipe import _codecs

SAMPLES: list[Any] = [None, True, 0, -(2**40), 1.5, "", "héllo ✓", [1, [2, [3]]], {"a": {"b": None}}]


@pytest.fixture(params=["pickle", "json", "msgpack"])
def codec(request: pytest.FixtureRequest) -> Any:
    if request.param not in _codecs.available_codecs():
        pytest.skip(f"{request.param} is not installed")
    return _codecs.get_codec(request.param)


@pytest.mark.parametrize("value", SAMPLES, ids=repr)
def test_round_trip(codec: Any, value: Any) -> None:
    data = codec.dumps(value)
    assert codec.loads(bytearray(data)) == value
    assert codec.loads(memoryview(bytes(data))) == value


def test_names_and_lookup() -> None:
    assert _codecs.get_codec(None).name == "pickle"
    assert _codecs.get_codec("json").name == "json"
    assert {"pickle", "json"} <= set(_codecs.available_codecs())
    with pytest.raises(ValueError, match="unknown codec"):
        _codecs.get_codec("yaml")
    with pytest.raises(TypeError, match="dumps"):
        _codecs.get_codec(object())


def test_a_custom_codec_object_is_used_as_is() -> None:
    class Upper:
        name = "upper"

        def dumps(self, obj: Any) -> bytes:
            return str(obj).upper().encode()

        def loads(self, buf: Any) -> Any:
            return bytes(buf).decode()

    codec = Upper()
    assert _codecs.get_codec(codec) is codec


def test_json_refuses_what_it_cannot_carry() -> None:
    codec = _codecs.get_codec("json")
    with pytest.raises(TypeError):
        codec.dumps(b"bytes")
    with pytest.raises(TypeError):
        codec.dumps(object())
    assert codec.loads(codec.dumps((1, 2))) == [1, 2]  # tuples come back as lists


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\xff\xfe", b"{", b"[" * 100_000, b"not json", pickle.dumps({"evil": 1})],
)
def test_json_garbage_is_a_value_error(garbage: bytes) -> None:
    with pytest.raises(ValueError):
        _codecs.get_codec("json").loads(garbage)


def test_json_never_unpickles() -> None:
    class Boom:
        def __reduce__(self) -> Any:
            return (pytest.fail, ("unpickled!",))

    with pytest.raises(ValueError):
        _codecs.get_codec("json").loads(pickle.dumps(Boom()))


def test_msgpack_garbage_is_a_value_error() -> None:
    if "msgpack" not in _codecs.available_codecs():
        pytest.skip("msgpack is not installed")
    codec = _codecs.get_codec("msgpack")
    assert codec.loads(codec.dumps(b"\x00bytes")) == b"\x00bytes"
    for garbage in (b"", b"\xc1", b"\x91", b"\xdd\xff\xff\xff\xff", pickle.dumps([1])):
        with pytest.raises(ValueError):
            codec.loads(garbage)
