"""What a worker sends can cost only that worker: bad bytes, values that explode when unpickled,
and processes a job forks that write where the worker does."""

from __future__ import annotations

import concurrent.futures
import struct
from concurrent.futures import Future
from typing import Any

import pytest

import jobs
import supervisor_jobs
from conftest import PoolFactory, busy_pids, wait_until, worker_pids
from corral import Pool, RemoteError, SerializationError, WorkerDiedError
from supervisor_jobs import frame


@pytest.fixture
def start_method() -> str:
    """How workers start does not matter here."""
    return "forkserver"


def outcome(future: Future[Any], picked_up: bool) -> BaseException | None:
    """The job's exception, read by the waiting caller itself or left to the supervisor."""
    if picked_up:
        return future.exception(20)
    done, _ = concurrent.futures.wait([future], timeout=20)
    assert done, "the job got no outcome"
    return future.exception(0)


WAYS = pytest.mark.parametrize("picked_up", [True, False], ids=["caller-reads", "supervisor-reads"])


@WAYS
@pytest.mark.parametrize("name", ["KeyboardInterrupt", "SystemExit"])
def test_a_result_whose_unpickling_raises_any_exception_fails_that_job_only(
    pool: Pool, name: str, picked_up: bool
) -> None:
    error = outcome(pool.submit(supervisor_jobs.return_raising_on_load, name), picked_up)
    assert isinstance(error, SerializationError), error
    assert "could not be unpickled in the parent" in str(error)
    assert name in str(error)
    assert pool.submit(jobs.add, 1, 2).result(20) == 3
    assert pool.statistics().failed == 1


@WAYS
def test_an_exception_whose_unpickling_raises_keyboard_interrupt_is_a_remote_error(
    pool: Pool, picked_up: bool
) -> None:
    future = pool.submit(supervisor_jobs.raise_raising_on_load, "KeyboardInterrupt")
    error = outcome(future, picked_up)
    assert isinstance(error, RemoteError), error
    assert error.type_name == "supervisor_jobs.LoadRaisingError"
    assert pool.submit(jobs.add, 1, 2).result(20) == 3


BAD_BYTES = {
    "log-not-a-pickle": frame(b"L" + b"not a pickle"),
    "output-not-a-pickle": frame(b"O" + b"\x80\x05junk"),
    "recalled-not-a-pickle": frame(b"B" + b"junk"),
    "log-not-a-dict": frame(b"L" + b"\x80\x04K\x01."),  # pickle of the int 1
    "unknown-tag": frame(b"?what"),
    "reply-too-short": frame(b"R\x00"),
    "length-2GiB": struct.pack("!i", 0x7FFFFFF0) + b"x" * 100,
    "long-length-1TiB": struct.pack("!i", -1) + struct.pack("!Q", 1 << 40) + b"x" * 100,
    "negative-length": struct.pack("!i", -5) + b"xxxxxxxx",
}


@pytest.mark.parametrize(
    ("data", "picked_up"),
    [(data, False) for data in BAD_BYTES.values()]
    + [(BAD_BYTES["log-not-a-pickle"], True), (BAD_BYTES["length-2GiB"], True)],
    ids=[*BAD_BYTES, "log-not-a-pickle-caller-reads", "length-2GiB-caller-reads"],
)
def test_bad_bytes_from_a_worker_cost_that_worker_only(
    make_pool: PoolFactory, data: bytes, picked_up: bool
) -> None:
    pool = make_pool(workers=2)
    other = pool.submit(jobs.sleep, 0.5)
    wait_until(lambda: busy_pids(pool), what="the other job to start")
    future = pool.submit(supervisor_jobs.log_then_send_raw, data, timeout=30)
    error = outcome(future, picked_up)
    assert isinstance(error, WorkerDiedError), error
    assert f"worker {error.pid} " in str(error)
    assert "malformed" in str(error)
    assert error.pid not in worker_pids(pool)
    assert other.result(20) == 0.5
    assert pool.submit(jobs.add, 1, 2).result(20) == 3
    stats = pool.statistics()
    assert (stats.crashed, stats.completed) == (1, 2)


@pytest.mark.parametrize(
    ("fn", "arg", "value"),
    [
        (supervisor_jobs.fork_and_print_big_lines, 3, "forked"),
        (supervisor_jobs.fork_pool_printing_big_lines, 8, list(range(8))),
    ],
    ids=["os.fork", "multiprocessing-fork-pool"],
)
def test_processes_forked_in_a_job_cannot_corrupt_the_channel(
    make_pool: PoolFactory, fn: Any, arg: int, value: Any
) -> None:
    """A forked child inherits the worker's output streams and log handler: what it prints or
    logs (lines over 16 KiB, at the same time as the worker) never mixes into the channel's
    frames."""
    pool = make_pool(workers=2)
    for _ in range(3):
        assert pool.submit(fn, arg, timeout=60).result(60) == value
    assert pool.submit(jobs.add, 1, 2).result(20) == 3
    stats = pool.statistics()
    assert (stats.completed, stats.crashed, stats.failed) == (4, 0, 0)
