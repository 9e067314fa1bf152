"""An existing ProcessPoolExecutor program, sped up by one line: ``hyperpipe.install()``.

Workers normalise numpy arrays of 8 MiB. With the standard library each array is pickled
to bytes and pushed through a pipe both ways; after ``install()`` the executor's queues are
hyperpipe's, and the arrays travel out of band through shared memory.

    python examples/pool_executor_one_line.py            # with hyperpipe
    python examples/pool_executor_one_line.py --stdlib   # without (for comparison)
"""

import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import hyperpipe

if "--stdlib" not in sys.argv:
    hyperpipe.install()  # the one line: every executor, Pool and Queue made after it


def normalise(block):
    return (block - block.mean()) / block.std()


def main():
    blocks = [np.random.default_rng(i).normal(size=1 << 20) for i in range(24)]  # 8 MiB each
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2) as executor:
        results = list(executor.map(normalise, blocks))
    elapsed = time.perf_counter() - started
    assert all(abs(r.mean()) < 1e-9 and abs(r.std() - 1) < 1e-9 for r in results)
    print(f"{len(results)} arrays of 8 MiB normalised in {elapsed:.2f} s "
          f"({'standard library' if '--stdlib' in sys.argv else 'hyperpipe'})")


if __name__ == "__main__":
    main()
