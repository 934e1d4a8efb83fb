"""A finished job holds nothing: its result, arguments and future go when the caller drops them,
whatever its timeout or start deadline."""

from __future__ import annotations

import collections
import gc
import weakref
from concurrent.futures import Future
from typing import Any

import psutil
import pytest

import jobs
import supervisor_jobs
from conftest import PoolFactory

MiB = 1 << 20


@pytest.fixture
def start_method() -> str:
    """How workers start does not matter here."""
    return "forkserver"


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


@pytest.mark.parametrize(
    "options",
    [{"timeout": 600}, {"start_within": 600}, {"timeout": 600, "start_within": 600}, {}],
    ids=["timeout", "start-deadline", "both", "neither"],
)
def test_finished_jobs_are_released_once_their_callers_drop_them(
    make_pool: PoolFactory, options: dict[str, Any]
) -> None:
    pool = make_pool(workers=2)
    refs: list[weakref.ref[Future[Any]]] = []
    # One at a time (the caller reads each reply), and many at once (the supervisor reads
    # them, and jobs wait in workers behind others).
    for number in range(50):
        future = pool.submit(jobs.echo, number, **options)
        assert future.result(20) == number
        refs.append(weakref.ref(future))
    futures = [pool.submit(jobs.echo, [number] * 100, **options) for number in range(500)]
    for number, future in enumerate(futures):
        assert future.result(20) == [number] * 100
    refs += [weakref.ref(future) for future in futures]
    del future, futures
    gc.collect()
    assert [ref for ref in refs if ref() is not None] == []


def test_big_results_are_released_at_once_whatever_the_timeout(make_pool: PoolFactory) -> None:
    pool = make_pool(workers=2)
    pool.submit(supervisor_jobs.payload, 1, timeout=600).result(20)  # warm
    before = rss()
    in_flight: collections.deque[Future[Any]] = collections.deque()
    for _ in range(200):  # a few at a time: only what is kept adds up
        if len(in_flight) == 4:
            assert len(in_flight.popleft().result(60)) == MiB
        in_flight.append(pool.submit(supervisor_jobs.payload, 1, timeout=600))
    while in_flight:
        assert len(in_flight.popleft().result(60)) == MiB
    assert rss() - before < 60 * MiB


def test_a_hundred_thousand_jobs_leave_no_trace(make_pool: PoolFactory) -> None:
    pool = make_pool(workers=2)
    in_flight: collections.deque[Future[Any]] = collections.deque()

    def run(count: int) -> None:
        for _ in range(count):
            if len(in_flight) == 200:
                in_flight.popleft().result(60)
            in_flight.append(pool.submit(jobs.noop, timeout=60))
        while in_flight:
            in_flight.popleft().result(60)

    run(2000)  # warm
    before = rss()
    run(100_000)
    assert rss() - before < 20 * MiB
    assert pool.statistics().completed == 102_000
