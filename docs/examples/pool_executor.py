"""The pool where a ``concurrent.futures.Executor`` is expected, with its job options kept.

Run it: ``python docs/examples/pool_executor.py``
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor

from corral import JobTimeoutError, Pool


def square(x: int) -> int:
    return x * x


def hang() -> None:
    time.sleep(3600)


async def in_the_loop(executor: Executor) -> int:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, square, 12)


if __name__ == "__main__":
    # preload: workers import this script as they start, not within its first job's timeout.
    with Pool(workers=2, preload=["__main__"]) as pool, pool.executor(timeout=1) as executor:
        print(list(executor.map(square, range(6))))  # one job per call, in order
        print(asyncio.run(in_the_loop(executor)))
        try:
            executor.submit(hang).result()
        except JobTimeoutError as exc:  # the executor's timeout=1: the worker is killed
            print(f"hang: {exc}")
        print(executor.submit(square, 3).result())  # the pool goes on
