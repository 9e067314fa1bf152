"""Codecs: how ``send(obj)`` / ``recv()`` turn objects into frames and back.

``pickle`` (the default) is what the standard library speaks, and it can run arbitrary
code while loading: use it only with peers you trust (an authkey proves that, see
docs/security.md). ``json`` and ``msgpack`` (when the ``msgpack`` package is installed)
only ever build plain data, so a server can take messages from peers it does not trust.

A codec is any object with ``dumps(obj) -> bytes-like`` and ``loads(buffer) -> obj``;
``get_codec`` also accepts the names above. ``loads`` errors are ``ValueError``
subclasses (or ``pickle.UnpicklingError`` for pickle) and consume only that message.
"""

from __future__ import annotations

import importlib
import json
import pickle
from typing import Any, Protocol, Union

__all__ = ["Codec", "PickleCodec", "JsonCodec", "MsgpackCodec", "get_codec", "available_codecs"]


class Codec(Protocol):
    name: str

    def dumps(self, obj: Any) -> Any: ...

    def loads(self, buffer: Any) -> Any: ...


class PickleCodec:
    """The standard library's format: any picklable object. Trusted peers only."""

    name = "pickle"

    def __init__(self, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
        self.protocol = protocol

    def dumps(self, obj: Any) -> bytes:
        return pickle.dumps(obj, self.protocol)

    def loads(self, buffer: Any) -> Any:
        return pickle.loads(buffer)

    def __repr__(self) -> str:
        return f"PickleCodec(protocol={self.protocol})"


class JsonCodec:
    """UTF-8 JSON: dicts with str keys, lists, str, int, float, bool, None.

    Tuples come back as lists and bytes are refused when sending (a ``TypeError``,
    with nothing sent). Safe to load from anyone: it never runs code, and deep nesting
    raises ``ValueError``, not ``RecursionError``.
    """

    name = "json"

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode(
            "utf-8"
        )

    def loads(self, buffer: Any) -> Any:
        data = bytes(buffer)
        try:
            return json.loads(data)
        except RecursionError:
            raise ValueError("JSON message nested too deeply") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"JSON message is not valid UTF-8: {exc}") from None

    def __repr__(self) -> str:
        return "JsonCodec()"


class MsgpackCodec:
    """MessagePack (needs the ``msgpack`` package): like JSON plus bytes, compact.

    Loading never runs code; msgpack's own limits bound containers by the message size.
    """

    name = "msgpack"

    def __init__(self) -> None:
        try:
            msgpack = importlib.import_module("msgpack")
        except ImportError:
            raise ImportError(
                "the 'msgpack' codec needs the msgpack package: pip install hyperpipe[msgpack]"
            ) from None
        self._msgpack = msgpack

    def dumps(self, obj: Any) -> bytes:
        return self._msgpack.packb(obj, use_bin_type=True)

    def loads(self, buffer: Any) -> Any:
        try:
            return self._msgpack.unpackb(buffer, raw=False, strict_map_key=False)
        except ValueError:
            raise
        except Exception as exc:  # msgpack raises a few non-ValueError types on garbage
            raise ValueError(f"invalid msgpack message: {exc}") from None

    def __repr__(self) -> str:
        return "MsgpackCodec()"


def available_codecs() -> list[str]:
    names = ["pickle", "json"]
    try:
        importlib.import_module("msgpack")
    except ImportError:
        pass
    else:
        names.append("msgpack")
    return names


CodecSpec = Union[str, Codec, None]


def get_codec(spec: CodecSpec) -> Codec:
    """A codec from its name (``"pickle"``, ``"json"``, ``"msgpack"``) or a codec object."""
    if spec is None or spec == "pickle":
        return PickleCodec()
    if isinstance(spec, str):
        if spec == "json":
            return JsonCodec()
        if spec == "msgpack":
            return MsgpackCodec()
        raise ValueError(f"unknown codec {spec!r} (expected one of {available_codecs()})")
    if not (callable(getattr(spec, "dumps", None)) and callable(getattr(spec, "loads", None))):
        raise TypeError(f"a codec needs dumps() and loads() methods, got {spec!r}")
    return spec
