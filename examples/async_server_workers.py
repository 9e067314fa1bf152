"""An asyncio server that fans work out to worker processes over hyperpipe.

    python examples/async_server_workers.py

- Worker processes are plain synchronous code: ``conn.recv()`` a job, ``conn.send()`` the
  result. Each talks to the server over its own ``hyperpipe.Pipe()``.
- The server is one event loop: ``hyperpipe.asyncio.serve()`` accepts clients (authkey
  handshake included) and a small pool hands each request to an idle worker, awaiting the
  worker's pipe with ``AsyncConnection`` -- no thread per request.
- A few clients (``hyperpipe.asyncio.connect``) submit jobs concurrently; the run ends by
  itself in a second or two.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import tempfile

import hyperpipe
from hyperpipe.asyncio import AsyncConnection, connect, serve

WORKERS = 2
CLIENTS = 8
JOBS_PER_CLIENT = 25
AUTHKEY = b"example secret"


def worker(conn: hyperpipe.Connection) -> None:
    """A synchronous worker process: hash the bytes of each job until told to stop."""
    while True:
        job = conn.recv()
        if job is None:
            return
        job_id, data, rounds = job
        digest = data
        for _ in range(rounds):
            digest = hashlib.sha256(digest).digest()
        conn.send((job_id, os.getpid(), digest.hex()[:16]))


class WorkerPool:
    """Idle workers wait in a queue; a request borrows one, awaits its answer, returns it."""

    def __init__(self, count: int) -> None:
        self.processes = []
        self.idle: asyncio.Queue[AsyncConnection] = asyncio.Queue()
        for _ in range(count):
            ours, theirs = hyperpipe.Pipe()
            proc = multiprocessing.Process(target=worker, args=(theirs,), daemon=True)
            proc.start()
            theirs.close()
            self.processes.append((proc, AsyncConnection(ours)))
            self.idle.put_nowait(self.processes[-1][1])

    async def run(self, job: tuple) -> tuple:
        conn = await self.idle.get()
        try:
            await conn.send(job)
            return await conn.recv()
        finally:
            self.idle.put_nowait(conn)

    async def close(self) -> None:
        for proc, conn in self.processes:
            await conn.send(None)
            await conn.aclose()
        for proc, _ in self.processes:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()


async def client(address: str, number: int) -> list:
    """One client: submit jobs one after another over an authenticated connection."""
    async with await connect(address, authkey=AUTHKEY, timeout=10) as conn:
        answers = []
        for i in range(JOBS_PER_CLIENT):
            await conn.send((f"c{number}-j{i}", f"payload {number} {i}".encode(), 2000))
            answers.append(await conn.recv())
        return answers


async def main() -> None:
    pool = WorkerPool(WORKERS)

    async def handle(conn: AsyncConnection) -> None:
        # One task per client; the loop serves all of them while the workers compute.
        async for job in conn:
            await conn.send(await pool.run(job))

    address = os.path.join(tempfile.mkdtemp(prefix="hyperpipe-example-"), "server.sock")
    try:
        async with await serve(handle, address, authkey=AUTHKEY) as server:
            print(f"serving on {server.address} with {WORKERS} worker processes")
            results = await asyncio.wait_for(
                asyncio.gather(*(client(server.address, n) for n in range(CLIENTS))), 30
            )
    finally:
        await pool.close()
        os.rmdir(os.path.dirname(address))

    answers = [a for per_client in results for a in per_client]
    by_worker: dict[int, int] = {}
    for _, pid, _ in answers:
        by_worker[pid] = by_worker.get(pid, 0) + 1
    print(f"{len(answers)} jobs answered for {CLIENTS} clients")
    for pid, count in sorted(by_worker.items()):
        print(f"  worker pid {pid}: {count} jobs")
    expected = {f"c{n}-j{i}" for n in range(CLIENTS) for i in range(JOBS_PER_CLIENT)}
    assert {job_id for job_id, _, _ in answers} == expected, "a job went missing"
    print("every job answered exactly once")


if __name__ == "__main__":
    asyncio.run(main())
