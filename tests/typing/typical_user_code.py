"""Typical user code, type-checked with mypy by tests/typing/test_typing.py (not run)."""

from __future__ import annotations

import multiprocessing
from multiprocessing import Process
from typing import Any

import hyperpipe
from hyperpipe import BufferTooShort, Connection, Pipe, wait


def worker(conn: Connection[Any, Any], count: int) -> None:
    for i in range(count):
        conn.send({"i": i, "square": i * i})
    conn.send(None)
    conn.close()


def drain(conn: Connection[Any, Any]) -> list[dict[str, int]]:
    results: list[dict[str, int]] = []
    while True:
        try:
            item = conn.recv()
        except EOFError:
            break
        if item is None:
            break
        results.append(item)
    return results


def with_bytes(a: Connection[Any, Any], b: Connection[Any, Any]) -> int:
    b.send_bytes(b"0123456789", 2, 5)
    b.send_bytes(bytearray(b"abc"))
    b.send_bytes(memoryview(b"xyz"))
    data: bytes = a.recv_bytes(maxlength=100)
    buf = bytearray(16)
    try:
        n: int = a.recv_bytes_into(buf, 4)
    except BufferTooShort as exc:
        n = len(exc.args[0])
    except multiprocessing.BufferTooShort:
        n = -1
    ready: bool = a.poll(0.5) or a.poll() or a.poll(None)
    fd: int = a.fileno()
    flags: tuple[bool, bool, bool] = (a.closed, a.readable, a.writable)
    return len(data) + n + fd + int(ready) + sum(flags)


def with_timeouts(a: Connection[Any, Any], b: Connection[Any, Any]) -> None:
    b.send("x", timeout=1.0)
    b.send_bytes(b"x", timeout=None)
    try:
        a.recv(timeout=0.1)
        a.recv_bytes(timeout=0.1)
        a.recv_bytes_into(bytearray(4), timeout=0.1)
    except hyperpipe.TimeoutError:
        pass
    except TimeoutError:
        pass


def main() -> None:
    parent, child = Pipe()
    reader, writer = Pipe(duplex=False)
    shm_a, shm_b = hyperpipe.Pipe(transport="socket")
    proc = Process(target=worker, args=(child, 10))
    proc.start()
    child.close()
    ready = wait([parent, reader, proc.sentinel], timeout=5.0)
    if parent in ready:
        print(drain(parent))
    with parent, reader, writer, shm_a, shm_b:
        print(with_bytes(shm_a, shm_b))
        with_timeouts(shm_a, shm_b)
    proc.join()
    print(hyperpipe.info()["transport"])


if __name__ == "__main__":
    main()
