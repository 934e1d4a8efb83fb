"""A crash, a hang and a CPU-heavy job: each costs itself, never the pool or this process.

Run it: ``python docs/examples/isolation.py``
"""

from __future__ import annotations

import ctypes
import os
import time

from corral import JobTimeoutError, Pool, WorkerDiedError


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def crash() -> None:
    ctypes.string_at(0)  # a segmentation fault: the worker process dies


def hang() -> None:
    while True:
        time.sleep(1)


def where() -> int:
    return os.getpid()


def main() -> None:
    with Pool(workers=2, kill_grace=0.5) as pool:
        print(f"app process {os.getpid()}, job process {pool.submit(where).result()}")

        heavy = pool.submit(fib, 27)
        crashed = pool.submit(crash)
        hung = pool.submit(hang, timeout=0.5)

        print(f"fib(27) = {heavy.result()}")
        try:
            crashed.result()
        except WorkerDiedError as error:
            print(f"crash: {error}")
        try:
            hung.result()
        except JobTimeoutError as error:
            print(f"hang: {error}")

        print(
            f"after all that, the pool still runs jobs: fib(20) = {pool.submit(fib, 20).result()}"
        )
        stats = pool.statistics()
        print(
            f"completed={stats.completed} crashed={stats.crashed} timed_out={stats.timed_out} "
            f"restarts={stats.restarts}"
        )


if __name__ == "__main__":
    main()
