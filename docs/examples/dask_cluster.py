"""Tasks on a Dask cluster: the scheduler stays in the app, each run goes to the cluster.

Run it: ``python docs/examples/dask_cluster.py`` (about ten seconds; needs
``pip install 'corral[dask]'``). Without ``dask_address`` corral starts a local cluster of
``workers`` processes and closes it at the end; with ``dask_address="tcp://scheduler:8786"`` (or
``CORRAL_DASK_ADDRESS``) the same tasks run on an existing cluster.
"""

import asyncio
import os
import time
from datetime import UTC, datetime

from asyncz.events.constants import TASK_ERROR, TASK_EXECUTED

from corral import Scheduler, SchedulerConfig, scheduler


@scheduler(name="rollup", trigger="interval", seconds=1, executor="dask")
def rollup() -> str:
    total = sum(i * i for i in range(1_000_000))  # CPU-heavy, on a Dask worker
    return f"rollup {total} in process {os.getpid()}"


@scheduler(name="import-feed", trigger="interval", seconds=1, executor="dask")
def import_feed() -> None:
    raise ValueError("the feed is empty today")


@scheduler(name="stuck", trigger="date", run_date=datetime.now(UTC), executor="dask", timeout=1)
def stuck() -> None:
    while True:  # never returns: its worker is restarted after the timeout
        time.sleep(0.1)


async def main() -> None:
    seen: dict[str, str] = {}
    done = asyncio.Event()

    def on_outcome(event: object) -> None:
        task = str(getattr(event, "task_id", ""))
        error = getattr(event, "exception", None)
        if error is None:
            seen.setdefault(task, str(getattr(event, "return_value", "")))
        else:
            seen.setdefault(task, f"{type(error).__name__}: {error}")
        if len(seen) == 3:
            done.set()

    config = SchedulerConfig(enabled=True, workers=2, mistrigger_grace_time=None)
    async with Scheduler(config) as running:
        assert running.asyncz is not None
        # One event per run, as with the local pool: its value, or its exception.
        running.asyncz.add_listener(on_outcome, TASK_EXECUTED | TASK_ERROR)
        await done.wait()
        ready = await running.wait_ready(120)  # the restarted worker is back
        cluster = running.cluster_statistics()
        assert cluster is not None
        state = "ready" if ready else "not all back yet"
        print(f"cluster {cluster.address}: {config.workers} workers {state}")
    print(f"app process {os.getpid()}")
    for task in ("rollup", "import-feed", "stuck"):
        print(f"{task}: {seen[task]}")


if __name__ == "__main__":
    asyncio.run(main())
