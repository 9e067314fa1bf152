"""The implementations the benchmark compares, one small class each.

An implementation makes the two ends of a channel in the orchestrator (``pair``) and turns
an end into a connection-like object in a worker (``open``). Workers only use
``send``/``recv``/``send_bytes``/``recv_bytes`` (plus the optional batch and zero-copy calls),
so ``multiprocessing`` and hyperpipe connections are used as they are, with no wrapper frame.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import platform
import tempfile
import uuid
from typing import Any, Optional

#: The baseline; it is always measured, so every other row has a ratio.
BASELINE = "mp"


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Impl:
    """One implementation: how to make a channel and use it from the two workers."""

    name = ""
    label = ""
    is_hyperpipe = False
    optional = False  # a third-party peer: skipped silently when its package is missing
    #: the implementation its ratio column compares with
    baseline = BASELINE
    #: which targets apply: "pipe" (issue 3's), "tcp", "async" or "" (none)
    kind = ""
    #: the tests it runs (None: all)
    tests: Optional[frozenset] = None

    def available(self) -> Optional[str]:
        """None when it can run here, else why not."""
        return None

    def version(self) -> Optional[str]:
        return None

    def features(self) -> dict:
        """Optional abilities, detected on a real connection: ``batch``, ``zero_copy``
        (views on receive), ``zero_copy_send`` (``shared_array``)."""
        return {"batch": False, "zero_copy": False, "zero_copy_send": False}

    def shared_array(self, conn: Any, n: int) -> Any:
        """A float64 array of ``n`` that ``send_array`` passes without copying."""
        raise NotImplementedError

    def pair(self, ctx: Any, scenario: str, params: dict) -> tuple:
        raise NotImplementedError

    def open(self, end: Any, role: str, params: dict) -> Any:
        return end

    def send_array(self, conn: Any, arr: Any) -> None:
        conn.send(arr)

    def recv_array(self, conn: Any, zero_copy: bool = False) -> Any:
        if zero_copy:
            return conn.recv(copy=False)
        return conn.recv()

    def close(self, conn: Any) -> None:
        closer = getattr(conn, "close", None)
        if closer is not None:
            closer()

    def parent_release(self, end_a: Any, end_b: Any) -> None:
        """Orchestrator, once both workers started: drop its own copies of the ends.

        Holding them would keep a channel alive after a worker died, and would count
        towards nothing useful.
        """
        for end in (end_a, end_b):
            closer = getattr(end, "close", None)
            if closer is not None:
                try:
                    closer()
                except OSError:
                    pass

    def cleanup(self, end_a: Any, end_b: Any) -> None:
        """Orchestrator, after both workers exited (or were killed)."""


class MpPipe(Impl):
    name = BASELINE
    label = "multiprocessing.Pipe(duplex=True)"

    def version(self) -> Optional[str]:
        return platform.python_version()

    def pair(self, ctx: Any, scenario: str, params: dict) -> tuple:
        return ctx.Pipe(duplex=True)


class HyperpipePipe(Impl):
    is_hyperpipe = True
    kind = "pipe"

    def __init__(self, transport: str):
        self.transport = transport
        self.name = f"hp-{transport}"
        self.label = f"hyperpipe.Pipe(duplex=True, transport={transport!r})"

    def available(self) -> Optional[str]:
        try:
            hyperpipe = importlib.import_module("hyperpipe")
            transports = importlib.import_module("hyperpipe._select").available_transports()
        except Exception as exc:  # the package is being written: say why, do not crash
            return f"import hyperpipe failed: {exc!r}"
        if not hasattr(hyperpipe, "Pipe"):
            return "hyperpipe.Pipe does not exist yet"
        if self.transport not in transports:
            return f"transport {self.transport!r} not available here (available: {transports})"
        return None

    def version(self) -> Optional[str]:
        return _version("hyperpipe")

    def _pipe(self) -> tuple:
        import hyperpipe

        return hyperpipe.Pipe(duplex=True, transport=self.transport)

    def features(self) -> dict:
        a, b = self._pipe()
        try:
            batch = hasattr(a, "send_bytes_many") and hasattr(b, "recv_bytes_many")
            try:
                accepts_copy = "copy" in inspect.signature(b.recv).parameters
            except (TypeError, ValueError):
                accepts_copy = False
            # The socket transport accepts copy=False but always copies (Connection.recv's
            # docstring): a zero-copy row for it would only repeat the ordinary one.
            zero_copy = accepts_copy and self.transport != "socket"
            zero_copy_send = zero_copy and hasattr(a, "allocate_buffer")
            return {"batch": batch, "zero_copy": zero_copy, "zero_copy_send": zero_copy_send}
        finally:
            a.close()
            b.close()

    def pair(self, ctx: Any, scenario: str, params: dict) -> tuple:
        return self._pipe()

    def shared_array(self, conn: Any, n: int) -> Any:
        import numpy as np

        return np.frombuffer(conn.allocate_buffer(8 * n), dtype=np.float64)


class MpTcp(Impl):
    name = "mp-tcp"
    label = "multiprocessing.connection Listener/Client, TCP 127.0.0.1"
    tests = frozenset({"lat_bytes", "lat_obj", "stream", "large"})
    _stdlib = True

    def version(self) -> Optional[str]:
        return platform.python_version()

    def pair(self, ctx: Any, scenario: str, params: dict) -> tuple:
        from hyperpipe._listener import loopback_pair

        return loopback_pair("AF_INET", b"bench-key", stdlib=self._stdlib)


class HyperpipeTcp(MpTcp):
    name = "hp-tcp"
    label = "hyperpipe Listener/Client, TCP 127.0.0.1"
    is_hyperpipe = True
    baseline = "mp-tcp"
    kind = "tcp"
    _stdlib = False

    def available(self) -> Optional[str]:
        return HyperpipePipe("socket").available()

    def version(self) -> Optional[str]:
        return _version("hyperpipe")


class HyperpipeAsync(HyperpipePipe):
    """The receiving/initiating worker awaits (hyperpipe.asyncio); the peer is synchronous."""

    kind = "async"
    tests = frozenset({"lat_bytes", "lat_obj", "large"})

    def __init__(self, transport: str):
        super().__init__(transport)
        self.name = f"hp-{transport}-async"
        self.label = f"hyperpipe.asyncio.AsyncConnection over transport={transport!r}"
        self.sync_name = f"hp-{transport}"

    def features(self) -> dict:
        return {"batch": False, "zero_copy": False, "zero_copy_send": False}

    def timed_round_trips(self, conn: Any, msg: Any, iters: int, warmup: int, payload: str) -> tuple:
        from hyperpipe.asyncio import _timed_round_trips

        return _timed_round_trips(conn, msg, iters, warmup=warmup, payload=payload)

    def open(self, end: Any, role: str, params: dict) -> Any:
        if role == "b":
            import asyncio

            from hyperpipe.asyncio import AsyncConnection

            self._loop = asyncio.new_event_loop()
            self._aconn = AsyncConnection(end)
        return end

    def recv_array(self, conn: Any, zero_copy: bool = False) -> Any:
        return self._loop.run_until_complete(self._aconn.recv())

    def run_receiver(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    async def arecv_array(self, conn: Any) -> Any:
        return await self._aconn.recv()

    def close(self, conn: Any) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.close()
        conn.close()


class ZmqPair(Impl):
    name = "zmq"
    label = "pyzmq PAIR ipc://"
    optional = True

    def available(self) -> Optional[str]:
        try:
            importlib.import_module("zmq")
        except Exception as exc:
            return f"import zmq failed: {exc!r}"
        return None

    def version(self) -> Optional[str]:
        return _version("pyzmq")

    def pair(self, ctx: Any, scenario: str, params: dict) -> tuple:
        # Only an address here: a zmq context must not cross a fork.
        path = os.path.join(tempfile.gettempdir(), f"hyperpipe-bench-{uuid.uuid4().hex[:12]}.ipc")
        return ("bind", path), ("connect", path)

    def open(self, end: Any, role: str, params: dict) -> Any:
        how, path = end
        return _ZmqConn(importlib.import_module("zmq"), how, path)

    def send_array(self, conn: Any, arr: Any) -> None:
        conn.sock.send(arr, copy=False)

    def recv_array(self, conn: Any, zero_copy: bool = False) -> Any:
        import numpy as np

        frame = conn.sock.recv(copy=False)
        return np.frombuffer(frame.buffer, dtype=np.float64)

    def parent_release(self, end_a: Any, end_b: Any) -> None:
        pass

    def cleanup(self, end_a: Any, end_b: Any) -> None:
        try:
            os.unlink(end_a[1])
        except OSError:
            pass


class _ZmqConn:
    def __init__(self, zmq: Any, how: str, path: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        getattr(self.sock, how)("ipc://" + path)
        self.send_bytes = self.sock.send
        self.recv_bytes = self.sock.recv
        self.send = self.sock.send_pyobj
        self.recv = self.sock.recv_pyobj

    def close(self) -> None:
        self.sock.close(linger=1000)
        self.ctx.term()


class FasterFifo(Impl):
    name = "faster-fifo"
    label = "faster_fifo.Queue (two queues)"
    optional = True

    def available(self) -> Optional[str]:
        try:
            importlib.import_module("faster_fifo")
        except Exception as exc:
            return f"import faster_fifo failed: {exc!r}"
        return None

    def version(self) -> Optional[str]:
        return _version("faster-fifo")

    def pair(self, ctx: Any, scenario: str, params: dict) -> tuple:
        faster_fifo = importlib.import_module("faster_fifo")
        size = max(1_000_000, int(params.get("max_msg", 0) * 1.05) + (1 << 20))
        a_to_b = faster_fifo.Queue(max_size_bytes=size)
        b_to_a = faster_fifo.Queue(max_size_bytes=size)
        return (b_to_a, a_to_b), (a_to_b, b_to_a)  # (inbox, outbox) of each end

    def open(self, end: Any, role: str, params: dict) -> Any:
        return _QueueConn(*end)

    def send_array(self, conn: Any, arr: Any) -> None:
        conn.outbox.put(arr, True, 600.0)

    def recv_array(self, conn: Any, zero_copy: bool = False) -> Any:
        return conn.inbox.get(True, 600.0)

    def parent_release(self, end_a: Any, end_b: Any) -> None:
        pass

    def close(self, conn: Any) -> None:
        pass


class _QueueConn:
    def __init__(self, inbox: Any, outbox: Any):
        self.inbox, self.outbox = inbox, outbox
        # put/get pickle everything, bytes included; a long timeout instead of the 10 s default
        self.send = self.send_bytes = lambda obj: outbox.put(obj, True, 600.0)
        self.recv = self.recv_bytes = lambda: inbox.get(True, 600.0)


def all_impls() -> list[Impl]:
    """Every implementation the benchmark knows, baseline first."""
    impls: list[Impl] = [MpPipe()]
    for transport in ("shm", "socket"):
        impls.append(HyperpipePipe(transport))
    impls += [HyperpipeAsync("shm"), HyperpipeAsync("socket"), MpTcp(), HyperpipeTcp()]
    impls += [ZmqPair(), FasterFifo()]
    return impls


def baseline_of(name: str) -> str:
    for impl in all_impls():
        if impl.name == name:
            return impl.baseline
    return BASELINE
