"""Workers that compute numpy arrays and hand them to the parent without copying them.

Each worker fills a buffer it got from ``conn.allocate_buffer`` (shared memory that both
processes already have mapped) and sends an array over it: nothing is copied on either
side. The parent waits on all workers at once with a ``WaitSet`` and reads each array
through a read-only view (``recv(copy=False)``).

    python examples/workers_send_arrays.py [workers] [arrays per worker] [MiB per array]
"""

from __future__ import annotations

import sys
import time
from multiprocessing import Process

import numpy as np

import hyperpipe


def worker(conn: hyperpipe.Connection, index: int, count: int, nbytes: int) -> None:
    for k in range(count):
        buf = conn.allocate_buffer(nbytes)  # shared memory, reused once the parent let go
        arr = np.frombuffer(buf, dtype=np.float64)
        arr[:] = index * 1000 + k  # "compute" in place
        conn.send((index, k, arr))  # the array's pages go across, not its bytes
        del arr, buf
    conn.send(None)
    conn.close()


def main() -> None:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    nbytes = (int(sys.argv[3]) if len(sys.argv) > 3 else 16) << 20
    conns, procs = [], []
    for i in range(workers):
        parent_end, child_end = hyperpipe.Pipe()
        p = Process(target=worker, args=(child_end, i, count, nbytes))
        p.start()
        child_end.close()
        conns.append(parent_end)
        procs.append(p)

    start = time.perf_counter()
    received = 0
    with hyperpipe.WaitSet(conns) as waitset:
        while waitset:
            for conn in waitset.wait(timeout=30):
                message = conn.recv(copy=False)  # read-only views of the worker's pages
                if message is None:
                    waitset.remove(conn)
                    conn.close()
                    continue
                index, k, arr = message
                assert arr[0] == arr[-1] == index * 1000 + k, "wrong data"
                received += arr.nbytes
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    print(f"{workers} workers sent {received / 2**20:,.0f} MiB of arrays in {elapsed:.2f} s "
          f"({received / elapsed / 1e9:.1f} GB/s), every array checked")


if __name__ == "__main__":
    main()
