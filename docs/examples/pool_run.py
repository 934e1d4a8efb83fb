"""``await pool.run(...)`` from asyncio and from trio: the same call under either.

Run it: ``python docs/examples/pool_run.py`` (the trio part needs ``pip install trio``).
"""

from __future__ import annotations

import asyncio
import math
import os

import trio

from corral import Pool


def factorial_bits(n: int) -> int:
    return math.factorial(n).bit_length()  # CPU-heavy, in a worker process


async def report(pool: Pool) -> str:
    # The value has the function's type (int here); the event loop never waits on the pool.
    bits = await pool.run(factorial_bits, 50_000, timeout=30)
    where = await pool.run(os.getpid)
    return f"{bits} bits, computed in process {where}"


if __name__ == "__main__":
    with Pool(workers=2) as pool:
        print(f"asyncio: {asyncio.run(report(pool))}")
        print(f"trio: {trio.run(report, pool)}")
        print(f"app process {os.getpid()}")
