"""A job's ``SystemExit``, ``KeyboardInterrupt`` or other non-``Exception`` ends that job only: the
caller gets a ``JobExitError`` saying what it raised, never the exception itself."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import worker_jobs
from conftest import PoolFactory, worker_pids
from corral import JobError, JobExitError

WAYS_OUT = {
    "exit:3": ("builtins.SystemExit", 3, "SystemExit with exit code 3"),
    "exit-text": ("builtins.SystemExit", "cannot go on", "exit code 'cannot go on'"),
    "exit-none": ("builtins.SystemExit", None, "SystemExit with exit code None"),
    "interrupt": ("builtins.KeyboardInterrupt", None, "raised KeyboardInterrupt"),
    "generator-exit": ("builtins.GeneratorExit", None, "raised GeneratorExit"),
    "base": ("worker_jobs.Stop", None, "raised Stop"),
}


@pytest.mark.parametrize("run_as", ["sync", "async"])
@pytest.mark.parametrize("how", sorted(WAYS_OUT))
def test_a_job_that_exits_or_is_interrupted_ends_with_a_job_exit_error(
    make_pool: PoolFactory, how: str, run_as: str
) -> None:
    pool = make_pool(workers=1)
    before = worker_pids(pool)
    fn = worker_jobs.leave if run_as == "sync" else worker_jobs.leave_async
    future = pool.submit(fn, how)
    error = future.exception(30)  # never raises what the job raised, whatever it was
    type_name, code, text = WAYS_OUT[how]
    assert isinstance(error, JobExitError), repr(error)
    assert isinstance(error, JobError)
    assert (error.type_name, error.exit_code, error.job_id) == (type_name, code, future.job_id)
    assert text in str(error)
    assert "worker_jobs:leave" in str(error)
    assert error.__cause__ is not None  # the worker's traceback
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.details) == (JobExitError, str(error), error.details)
    # The worker lives on and runs the next job, sync or async.
    assert pool.submit(worker_jobs.async_add, 1, 2).result(30) == 3
    assert pool.submit(pow, 2, 5).result(30) == 32
    assert worker_pids(pool) == before
    assert pool.statistics().failed == 1


APP = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {tests!r})
    import worker_jobs
    from corral import JobExitError, Pool

    async def main(pool):
        for how in ("exit:3", "interrupt"):
            try:
                await pool.run(worker_jobs.leave, how)
            except JobExitError as error:
                print("async", error.type_name, error.exit_code, flush=True)
        return await pool.run(worker_jobs.async_add, 1, 1)

    if __name__ == "__main__":
        with Pool(workers=1, start_method={method!r}) as pool:
            print("value", asyncio.run(main(pool)), flush=True)
            for how in ("exit:4", "interrupt"):
                error = pool.submit(worker_jobs.leave, how).exception(60)
                print("thread", type(error).__name__, flush=True)
                try:
                    pool.submit(worker_jobs.leave, how).result(60)
                except JobExitError:
                    print("caught", flush=True)
        print("done", flush=True)
    """
)


def test_an_app_goes_on_after_its_jobs_exit_or_are_interrupted(
    start_method: str, tmp_path: Path
) -> None:
    """Under asyncio and from a thread, the app sees a JobExitError and carries on; it neither
    exits with the job's status, nor dies of its KeyboardInterrupt, nor hangs at shutdown."""
    script = tmp_path / "app.py"
    script.write_text(APP.format(tests=str(Path(__file__).parent), method=start_method))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "async builtins.SystemExit 3",
        "async builtins.KeyboardInterrupt None",
        "value 2",
        "thread JobExitError",
        "caught",
        "thread JobExitError",
        "caught",
        "done",
    ]
