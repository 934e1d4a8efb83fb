"""corral's Dask executor, side by side with corral's local pool and asyncz's thread pool.

    python benchmarks/dask.py [--tasks 2000] [--repeat 3] [--json FILE]

For each executor, on an AsyncIOScheduler in this process, with 2 workers (the Dask executor: an
embedded LocalCluster of 2 worker processes, one thread each):
- cold start: from starting the executor to the first run's outcome;
- per-run overhead: no-op runs due 50 ms apart (one at a time): from a run's due time to its
  start in the worker, and to its outcome event (p50, p99);
- throughput: ``--tasks`` no-op tasks due now, until every outcome event has arrived;
- app loop lag while two CPU-bound runs (3 s each) run on the workers: a 10 ms heartbeat (p99
  and max).
And, for scale, Dask alone on the same LocalCluster: ``Client.submit`` of a no-op, one at a
time (round trip) and ``--tasks`` at once (tasks/s), without corral or asyncz.
Medians of ``--repeat`` runs with min-max.
"""

from __future__ import annotations

import os
import sys

# This file is named like the ``dask`` package: it must not shadow it for the imports below (or
# in the Dask workers, which start with this process's sys.path).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
import dask  # noqa: E402,F401  (the package, imported before this folder goes back on the path)

sys.path.append(_HERE)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

from asyncz.events.constants import TASK_ERROR, TASK_EXECUTED, TASK_MISSED  # noqa: E402
from asyncz.executors import ThreadPoolExecutor  # noqa: E402
from asyncz.schedulers import AsyncIOScheduler  # noqa: E402
from asyncz.triggers import DateTrigger  # noqa: E402
from bench_jobs import burn, noop, started_at  # noqa: E402
from report import combine, p99  # noqa: E402

from corral import DaskExecutor, ProcessExecutor  # noqa: E402

WORKERS = 2
DASK_ALONE = "Dask alone (Client.submit)"
EXECUTORS: dict[str, Callable[[], Any]] = {
    "corral DaskExecutor (LocalCluster)": lambda: DaskExecutor(workers=WORKERS),
    "corral ProcessExecutor": lambda: ProcessExecutor(workers=WORKERS, preload=("bench_jobs",)),
    "asyncz ThreadPoolExecutor": lambda: ThreadPoolExecutor(max_workers=WORKERS),
}


class Outcomes:
    """Counts outcome events and wakes a waiter when enough have arrived."""

    def __init__(self) -> None:
        self.events: list[tuple[float, Any]] = []
        self.wanted = 0
        self.enough = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def __call__(self, event: Any) -> None:
        self.events.append((time.time(), event))
        if len(self.events) >= self.wanted:
            self.loop.call_soon_threadsafe(self.enough.set)

    async def wait(self, count: int, timeout: float) -> bool:
        self.wanted = count
        if len(self.events) >= count:
            return True
        self.enough.clear()
        try:
            await asyncio.wait_for(self.enough.wait(), timeout)
        except TimeoutError:
            return False
        return True


async def started(make: Callable[[], Any], *, ready: bool = True) -> tuple[Any, Outcomes]:
    executor = make()
    scheduler = AsyncIOScheduler(
        executors={"default": executor},
        task_defaults={"mistrigger_grace_time": 3600, "coalesce": False, "max_instances": 1},
    )
    outcomes = Outcomes()
    scheduler.add_listener(outcomes, TASK_EXECUTED | TASK_ERROR | TASK_MISSED)
    scheduler.start(paused=True)
    if ready:
        await asyncio.to_thread(_wait_ready, executor)
    return scheduler, outcomes


def _wait_ready(executor: Any) -> None:
    if isinstance(executor, DaskExecutor):
        executor.wait_ready(120)
    elif isinstance(executor, ProcessExecutor) and executor.pool is not None:
        executor.pool.wait_ready(120)


async def stop(scheduler: AsyncIOScheduler) -> None:
    scheduler.shutdown(wait=True)
    await asyncio.sleep(0.05)  # asyncz shuts down on its loop


def at(moment: datetime) -> DateTrigger:
    return DateTrigger(run_at=moment)


async def cold_start(make: Callable[[], Any]) -> float:
    begin = time.perf_counter()
    scheduler, outcomes = await started(make, ready=False)
    scheduler.add_task(noop, trigger=at(datetime.now(UTC)), id="first")
    scheduler.resume()
    await outcomes.wait(1, timeout=120)
    elapsed = time.perf_counter() - begin
    await stop(scheduler)
    return elapsed


async def overhead(make: Callable[[], Any], count: int = 100) -> dict[str, float]:
    scheduler, outcomes = await started(make)
    first = datetime.now(UTC) + timedelta(seconds=0.5)
    for i in range(count):
        due = first + timedelta(milliseconds=50 * i)
        scheduler.add_task(started_at, trigger=at(due), id=f"latency-{i}")
    scheduler.resume()
    await outcomes.wait(count, timeout=120)
    await stop(scheduler)
    to_start, to_event = [], []
    for seen, event in outcomes.events:
        due = event.scheduled_run_time.timestamp()
        if event.code == TASK_EXECUTED and isinstance(event.return_value, float):
            to_start.append(event.return_value - due)
        to_event.append(seen - due)
    return {
        "start_median_ms": statistics.median(to_start) * 1000 if to_start else float("nan"),
        "event_median_ms": statistics.median(to_event) * 1000,
        "event_p99_ms": p99(to_event) * 1000,
    }


async def throughput(make: Callable[[], Any], count: int) -> float:
    scheduler, outcomes = await started(make)
    now = datetime.now(UTC)
    for i in range(count):
        scheduler.add_task(noop, trigger=at(now), id=f"noop-{i}")
    begin = time.perf_counter()
    scheduler.resume()
    done = await outcomes.wait(count, timeout=600)
    elapsed = time.perf_counter() - begin
    await stop(scheduler)
    return count / elapsed if done else float("nan")


async def loop_lag(make: Callable[[], Any], seconds: float = 3.0) -> dict[str, float]:
    scheduler, outcomes = await started(make)
    now = datetime.now(UTC)
    for i in range(WORKERS):
        scheduler.add_task(burn, args=(seconds,), trigger=at(now), id=f"cpu-{i}")
    lags: list[float] = []
    scheduler.resume()
    end = time.monotonic() + seconds + 0.5
    while time.monotonic() < end:
        before = time.monotonic()
        await asyncio.sleep(0.01)
        lags.append(time.monotonic() - before - 0.01)
    await outcomes.wait(WORKERS, timeout=60)
    await stop(scheduler)
    return {"lag_p99_ms": p99(lags) * 1000, "lag_max_ms": max(lags) * 1000}


async def dask_alone(tasks: int, count: int = 100) -> dict[str, float]:
    """Dask's own floor: a no-op through ``Client.submit`` on the same kind of cluster."""
    import distributed as _distributed

    distributed: Any = _distributed  # untyped calls: their signatures vary across versions
    cluster = await distributed.LocalCluster(
        n_workers=WORKERS,
        threads_per_worker=1,
        processes=True,
        memory_limit=0,
        # No dashboard; its HTTP server (health checks) on a free loopback port,
        # not 8787 (taken when another cluster runs: Dask then warns).
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": False},
        asynchronous=True,
    )
    client = await distributed.Client(cluster, asynchronous=True, set_as_default=False)
    try:
        await client.submit(noop, pure=False)  # warm
        trips = []
        for _ in range(count):
            begin = time.perf_counter()
            await client.submit(noop, pure=False)
            trips.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        futures = [client.submit(noop, pure=False) for _ in range(tasks)]
        await client.gather(futures)
        rate = tasks / (time.perf_counter() - begin)
        await client.cancel(futures)  # released before the cluster closes
    finally:
        await client.close()
        await cluster.close()
    return {"round_trip_ms": statistics.median(trips) * 1000, "throughput": rate}


async def measure(tasks: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for name, make in EXECUTORS.items():
        row: dict[str, float] = {"cold_start_s": await cold_start(make)}
        row.update(await overhead(make))
        row["throughput"] = await throughput(make, tasks)
        row.update(await loop_lag(make))
        results[name] = row
    results[DASK_ALONE] = await dask_alone(tasks)
    return results


def table(combined: dict[str, dict[str, list[float]]]) -> str:
    header = (
        f"{'':36}{'cold start':>11}{'due→start':>10}{'due→event':>10}{'due→event':>10}"
        f"{'tasks/s':>9}{'lag p99':>9}{'lag max':>9}"
    )
    lines = [
        header,
        f"{'':36}{'(s)':>11}{'p50 (ms)':>10}{'p50 (ms)':>10}{'p99 (ms)':>10}{'':9}"
        f"{'(ms)':>9}{'(ms)':>9}",
    ]
    for name, m in combined.items():
        if name == DASK_ALONE:
            continue
        lines.append(
            f"{name:36}{m['cold_start_s'][0]:>11.2f}{m['start_median_ms'][0]:>10.2f}"
            f"{m['event_median_ms'][0]:>10.2f}{m['event_p99_ms'][0]:>10.2f}"
            f"{m['throughput'][0]:>9.0f}{m['lag_p99_ms'][0]:>9.1f}{m['lag_max_ms'][0]:>9.1f}"
        )
    alone = combined[DASK_ALONE]
    lines.append(
        f"{DASK_ALONE}, for scale: round trip p50 {alone['round_trip_ms'][0]:.2f} ms, "
        f"{alone['throughput'][0]:.0f} tasks/s"
    )
    lines.append("medians of the repeated runs (min-max in the JSON)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    runs = [asyncio.run(measure(args.tasks)) for _ in range(args.repeat)]
    combined = combine(runs)
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {WORKERS} workers, "
        f"{args.tasks} tasks, {args.repeat} runs"
    )
    print(table(combined))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {"machine": platform.platform(), "cpus": os.cpu_count(), "results": combined},
                out,
                indent=2,
            )


if __name__ == "__main__":
    main()
