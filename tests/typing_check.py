"""Checked by mypy, never run: the pool's results have the types of the functions' values.

``assert_type`` fails the ``mypy`` run when a type differs from the one written here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from typing import Any, assert_type

import jobs
from corral import JobFuture, Pool, PoolExecutor


async def pool_results(pool: Pool) -> None:
    assert_type(pool.submit(jobs.add, 1, 2), JobFuture[int])
    assert_type(pool.submit(jobs.add, 1, 2).result(), int)
    assert_type(pool.submit(jobs.async_add, 1, 2), JobFuture[int])  # its coroutine's value
    assert_type(pool.submit(jobs.noop), JobFuture[None])
    assert_type(pool.submit(jobs.fail, "no"), JobFuture[Any])
    assert_type(pool.submit("jobs:add", 1, 2), JobFuture[Any])
    assert_type(await pool.run(jobs.add, 1, 2), int)
    assert_type(await pool.run(jobs.async_add, 1, 2, timeout=5), int)
    assert_type(await pool.run(jobs.sleep, 0.1, label="nap"), float)
    assert_type(await pool.run("jobs:add", 1, 2), Any)
    future: Future[int] = pool.submit(jobs.add, 1, 2)  # a concurrent.futures.Future
    assert_type(future, Future[int])


async def executor_results(pool: Pool) -> None:
    executor = pool.executor(timeout=5, start_within=1, label="report")
    assert_type(executor, PoolExecutor)
    as_executor: Executor = executor
    assert_type(executor.submit(jobs.add, 1, 2), JobFuture[int])
    assert_type(executor.submit(jobs.async_add, 1, 2), JobFuture[int])
    assert_type(executor.submit(jobs.takes, value=3), JobFuture[str])
    assert_type(as_executor.submit(jobs.add, 1, 2), Future[int])
    assert_type(executor.map(jobs.add, [1], [2]), Iterator[int])
    loop = asyncio.get_running_loop()
    assert_type(await loop.run_in_executor(executor, jobs.add, 1, 2), int)
