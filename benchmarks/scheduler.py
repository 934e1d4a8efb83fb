"""corral through asyncz, side by side with asyncz's own executors, in one run.

    python benchmarks/scheduler.py [--tasks 20000] [--repeat 3] [--json FILE] [--plot FILE]

For each executor (corral's ProcessExecutor; asyncz's AsyncIOExecutor, ThreadPoolExecutor and
ProcessPoolExecutor), on an AsyncIOScheduler in this process, with 2 workers where there is a pool:
- throughput: ``--tasks`` no-op tasks due now, until every outcome event has arrived;
- add_task from another thread, in a fresh process for each executor and run: the scheduler on
  an event loop of its own thread, a producer thread adds ``--tasks`` no-op tasks due now while
  it runs; tasks/s from the first ``add_task`` until every outcome event has arrived, and the
  CPU time each thread of the process spent per task meanwhile (the adding thread, the
  scheduler's loop, the executor's own threads); also for asyncz alone, with an executor that
  does nothing but report each run;
- latency: from a run's due time to its start in the executor, and to its outcome event;
- app loop lag while two CPU-bound sync tasks and two CPU-bound ``async def`` tasks run
  (p99 and max, and the lag over time for ``--plot``);
- recovery: from a task that kills its worker to the next run of another task succeeding.
Medians of ``--repeat`` runs with min-max; ratios against asyncz's ThreadPoolExecutor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import psutil
from asyncz.events import TaskExecutionEvent
from asyncz.events.constants import TASK_ERROR, TASK_EXECUTED, TASK_MISSED
from asyncz.executors import AsyncIOExecutor, ProcessPoolExecutor, ThreadPoolExecutor
from asyncz.executors.base import BaseExecutor
from asyncz.schedulers import AsyncIOScheduler
from asyncz.triggers import DateTrigger
from bench_jobs import burn, burn_async, die, noop, started_at
from report import combine, p99

from corral import ProcessExecutor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WORKERS = 2
UTC = UTC
EXECUTORS: dict[str, Callable[[], Any]] = {
    # preload: as corral's Scheduler does for its tasks' modules
    "corral ProcessExecutor": lambda: ProcessExecutor(workers=WORKERS, preload=("bench_jobs",)),
    "asyncz AsyncIOExecutor": AsyncIOExecutor,
    "asyncz ThreadPoolExecutor": lambda: ThreadPoolExecutor(max_workers=WORKERS),
    "asyncz ProcessPoolExecutor": lambda: ProcessPoolExecutor(max_workers=WORKERS),
}
BASELINE = "asyncz ThreadPoolExecutor"
ALONE = "asyncz alone (no executor work)"


class DoNothing(BaseExecutor):
    """Reports each run time as executed at once, on the scheduler's loop: what asyncz costs
    without an executor."""

    def send_task(self, task: Any, run_times: list[datetime]) -> None:
        self.do_send_task(task, run_times)

    def do_send_task(self, task: Any, run_times: list[datetime]) -> None:
        for run_time in run_times:
            self.scheduler.dispatch_event(
                TaskExecutionEvent(
                    code=TASK_EXECUTED,
                    task_id=task.id,
                    store=task.store_alias,
                    scheduled_run_time=run_time,
                )
            )


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


class Arrivals:
    """Counts outcome events from whichever thread dispatches them; notes when the wanted one
    arrived (``time.perf_counter()``)."""

    def __init__(self) -> None:
        self.count = 0
        self.wanted = math.inf
        self.last = float("nan")
        self._changed = threading.Condition()

    def __call__(self, event: Any) -> None:
        with self._changed:
            self.count += 1
            if self.count >= self.wanted:
                self.last = time.perf_counter()
                self.wanted = math.inf
                self._changed.notify_all()

    def wait(self, count: int, timeout: float) -> bool:
        with self._changed:
            self.wanted = count
            return self._changed.wait_for(lambda: self.count >= count, timeout)


async def started(make: Callable[[], Any]) -> tuple[AsyncIOScheduler, Outcomes]:
    scheduler = AsyncIOScheduler(
        executors={"default": make()},
        task_defaults={"mistrigger_grace_time": 3600, "coalesce": False, "max_instances": 1},
    )
    outcomes = Outcomes()
    scheduler.add_listener(outcomes, TASK_EXECUTED | TASK_ERROR | TASK_MISSED)
    scheduler.start(paused=True)
    return scheduler, outcomes


async def stop(scheduler: AsyncIOScheduler) -> None:
    scheduler.shutdown(wait=True)
    await asyncio.sleep(0.05)  # asyncz shuts down on its loop


def at(moment: datetime) -> DateTrigger:
    return DateTrigger(run_at=moment)


async def throughput(make: Callable[[], Any], count: int) -> float:
    scheduler, outcomes = await started(make)
    now = datetime.now(UTC)
    for i in range(count):
        scheduler.add_task(noop, trigger=at(now), id=f"noop-{i}")
    begin = time.perf_counter()
    scheduler.resume()
    done = await outcomes.wait(count, timeout=300)
    elapsed = time.perf_counter() - begin
    await stop(scheduler)
    return count / elapsed if done else float("nan")


def from_a_thread(make: Callable[[], Any], count: int) -> dict[str, float]:
    """tasks/s with the scheduler on an event loop of its own thread while a producer thread
    calls ``add_task`` ``count`` times (no-op tasks due now): from the first ``add_task`` until
    every outcome event has arrived. A first task warms the executor before the clock starts.
    Also the CPU time per task of the adding thread, of the scheduler's loop, and of the other
    threads of this process (the executor's own) over the same span, in µs."""
    scheduler = AsyncIOScheduler(
        executors={"default": make()},
        task_defaults={"mistrigger_grace_time": 3600, "coalesce": False, "max_instances": 1},
        isolated_event_loop=True,  # its own loop, on a thread of its own
    )
    arrivals = Arrivals()
    scheduler.add_listener(arrivals, TASK_EXECUTED | TASK_ERROR | TASK_MISSED)
    scheduler.start()
    loop_thread = scheduler.event_loop_thread
    scheduler.add_task(noop, trigger=at(datetime.now(UTC)), id="warm")
    arrivals.wait(1, timeout=60)
    time.sleep(0.5)  # every worker of a pool started
    began: list[float] = []
    adding: list[float] = []

    def produce() -> None:
        now = datetime.now(UTC)
        began.append(time.perf_counter())
        cpu = time.thread_time()
        for i in range(count):
            scheduler.add_task(noop, trigger=at(now), id=f"from-thread-{i}")
        adding.append(time.thread_time() - cpu)

    producer = threading.Thread(target=produce, name="producer")
    before = thread_times()
    producer.start()
    done = arrivals.wait(1 + count, timeout=300)
    after = thread_times()
    producer.join()
    scheduler.shutdown(wait=True)
    if loop_thread is not None:
        loop_thread.join(30)
    rate = count / (arrivals.last - began[0]) if done else float("nan")
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop_id = None if loop_thread is None else loop_thread.native_id
    skip = {loop_id, producer.native_id, threading.main_thread().native_id}
    per_task = 1e6 / count
    return {
        "from_thread": rate,
        "cpu_adding_us": adding[0] * per_task,
        "cpu_loop_us": (0.0 if loop_id is None else spent.get(loop_id, 0.0)) * per_task,
        "cpu_executor_us": sum(t for tid, t in spent.items() if tid not in skip) * per_task,
    }


def thread_times() -> dict[int, float]:
    """CPU seconds each live thread of this process has used, by native thread id."""
    return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}


async def latency(make: Callable[[], Any], count: int = 200) -> dict[str, float]:
    scheduler, outcomes = await started(make)
    first = datetime.now(UTC) + timedelta(seconds=1)
    for i in range(count):
        due = first + timedelta(milliseconds=20 * i)
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
        "start_median_ms": _ms(statistics.median(to_start)) if to_start else float("nan"),
        "start_p99_ms": _ms(p99(to_start)) if to_start else float("nan"),
        "event_median_ms": _ms(statistics.median(to_event)),
        "event_p99_ms": _ms(p99(to_event)),
    }


async def loop_lag(
    make: Callable[[], Any], seconds: float = 3.0
) -> tuple[dict[str, float], list[float]]:
    scheduler, outcomes = await started(make)
    now = datetime.now(UTC)
    for i in range(2):
        scheduler.add_task(burn, args=(seconds,), trigger=at(now), id=f"cpu-sync-{i}")
        scheduler.add_task(burn_async, args=(seconds,), trigger=at(now), id=f"cpu-async-{i}")
    lags: list[float] = []
    scheduler.resume()
    end = time.monotonic() + seconds + 0.5
    while time.monotonic() < end:
        before = time.monotonic()
        await asyncio.sleep(0.01)
        lags.append(time.monotonic() - before - 0.01)
    await outcomes.wait(4, timeout=60)
    await stop(scheduler)
    return {"lag_p99_ms": _ms(p99(lags)), "lag_max_ms": _ms(max(lags))}, lags


async def recovery(make: Callable[[], Any]) -> float:
    """Seconds from a run that kills its worker to the next run that succeeds (nan: none in
    10 s). The probes are due 0.2 s after the crash, then every 0.5 s."""
    scheduler, outcomes = await started(make)
    scheduler.resume()
    scheduler.add_task(noop, trigger=at(datetime.now(UTC)), id="warm")
    await outcomes.wait(1, timeout=60)
    crash_at = datetime.now(UTC) + timedelta(seconds=0.1)
    scheduler.add_task(die, trigger=at(crash_at), id="crash")
    for i in range(20):
        due = crash_at + timedelta(seconds=0.2 + 0.5 * i)
        scheduler.add_task(noop, trigger=at(due), id=f"probe-{i}")
    deadline = time.monotonic() + 12
    recovered = float("nan")
    while time.monotonic() < deadline:
        await outcomes.wait(len(outcomes.events) + 1, timeout=max(0.0, deadline - time.monotonic()))
        ok = [
            seen
            for seen, e in outcomes.events
            if e.code == TASK_EXECUTED and e.task_id.startswith("probe-")
        ]
        if ok:
            recovered = min(ok) - crash_at.timestamp()
            break
    with contextlib.suppress(Exception):  # asyncz's broken process pool may fail to shut down
        await asyncio.wait_for(stop(scheduler), 10)
    return recovered


async def measure(tasks: int) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    results: dict[str, dict[str, float]] = {}
    lag_series: dict[str, list[float]] = {}
    for name, make in EXECUTORS.items():
        row: dict[str, float] = {"throughput": await throughput(make, tasks)}
        row.update(from_a_thread_afresh(name, tasks))
        row.update(await latency(make))
        lag, series = await loop_lag(make)
        row.update(lag)
        lag_series[name] = series
        # In-process executors run the crash in this process: it would end the benchmark (and the
        # app), so there is nothing to recover; reported as never.
        in_process = name in ("asyncz AsyncIOExecutor", "asyncz ThreadPoolExecutor")
        row["recovery_s"] = float("nan") if in_process else await recovery(make)
        results[name] = row
    results[ALONE] = from_a_thread_afresh(ALONE, tasks)
    return results, lag_series


def from_a_thread_afresh(name: str, tasks: int) -> dict[str, float]:
    """:func:`from_a_thread` for executor ``name`` in a process of its own: what the runs
    before it in this process left behind (threads, a fork server, the heap they grew) slowed
    the figures, and not evenly: in one comparison, the thread pool's by a fifth and corral's by
    less than a tenth."""
    found = subprocess.run(
        [sys.executable, __file__, "--tasks", str(tasks), "--from-a-thread", name],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(found.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def _ms(seconds: float) -> float:
    return seconds * 1000


def table(combined: dict[str, dict[str, list[float]]]) -> str:
    base = combined[BASELINE]
    header = (
        f"{'':28}{'tasks/s':>9}{'vs thread':>10}{'start p50':>10}{'start p99':>10}"
        f"{'event p50':>10}{'event p99':>10}{'lag p99':>9}{'lag max':>9}{'lag vs thr':>11}"
        f"{'recovery':>10}"
    )
    lines = [
        header,
        f"{'':28}{'':9}{'':10}{'(ms)':>10}{'(ms)':>10}{'(ms)':>10}{'(ms)':>10}"
        f"{'(ms)':>9}{'(ms)':>9}{'':11}{'(s)':>10}",
    ]
    for name, m in combined.items():
        if name == ALONE:
            continue
        lag_ratio = (
            base["lag_p99_ms"][0] / m["lag_p99_ms"][0] if m["lag_p99_ms"][0] else float("inf")
        )
        lines.append(
            f"{name:28}{m['throughput'][0]:>9.0f}"
            f"{m['throughput'][0] / base['throughput'][0]:>9.2f}x"
            f"{m['start_median_ms'][0]:>10.2f}{m['start_p99_ms'][0]:>10.2f}"
            f"{m['event_median_ms'][0]:>10.2f}{m['event_p99_ms'][0]:>10.2f}"
            f"{m['lag_p99_ms'][0]:>9.1f}{m['lag_max_ms'][0]:>9.1f}{lag_ratio:>10.1f}x"
            f"{m['recovery_s'][0]:>10.3f}"
        )
    lines.append("medians of the repeated runs (min-max in the JSON); 'lag vs thr': how many times")
    lines.append(
        "lower the app loop's p99 lag is than with asyncz's ThreadPoolExecutor; recovery nan:"
    )
    lines.append("never (in-process executors: the crash ends the app itself)")
    lines.append("")
    lines.append(
        "add_task from another thread (the scheduler on its own loop thread; from the first"
    )
    lines.append("add_task until every outcome event has arrived), and the CPU time per task of")
    lines.append("this process's threads meanwhile:")
    lines.append(
        f"{'':32}{'tasks/s':>9}{'vs thread':>10}{'adding':>9}{'loop':>9}{'executor':>9}"
        f"{'in all':>9}"
    )
    lines.append(f"{'':32}{'':9}{'':10}{'(µs)':>9}{'(µs)':>9}{'(µs)':>9}{'(µs)':>9}")
    for name, m in combined.items():
        cpu = [m["cpu_adding_us"][0], m["cpu_loop_us"][0], m["cpu_executor_us"][0]]
        lines.append(
            f"{name:32}{m['from_thread'][0]:>9.0f}"
            f"{m['from_thread'][0] / base['from_thread'][0]:>9.2f}x"
            + "".join(f"{us:>9.0f}" for us in [*cpu, sum(cpu)])
        )
    lines.append("'executor': the threads of the executor (corral's supervisor, the thread pool's")
    lines.append("workers); each column is the median of its own runs")
    return "\n".join(lines)


def lag_figure(series: dict[str, list[float]]) -> Figure:
    """The loop-lag plot: one line per executor, the legend under the axes (never on the data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.8), layout="constrained")
    for name, lags in series.items():
        # Each sample is taken when a 10 ms sleep returns: a blocked loop shows as one long gap.
        moments, now = [], 0.0
        for lag in lags:
            now += 0.01 + lag
            moments.append(now)
        (line,) = axis.plot(
            moments, [lag * 1000 for lag in lags], marker=".", markersize=3, label=name
        )
        if lags and max(lags) >= 1:
            worst = max(range(len(lags)), key=lags.__getitem__)
            axis.annotate(
                f"{name}: loop blocked {lags[worst]:.1f} s",
                (moments[worst], lags[worst] * 1000),
                xytext=(-8, -4),
                textcoords="offset points",
                ha="right",
                va="top",
                color=line.get_color(),
            )
    axis.set_yscale("symlog", linthresh=1)
    axis.set_xlabel("seconds since two CPU-bound sync and two CPU-bound async tasks were due")
    axis.set_ylabel("app event loop lag (ms)")
    axis.set_title("App loop lag while CPU-heavy tasks run, per executor")
    axis.grid(True, which="major", alpha=0.3)
    figure.legend(loc="outside lower center", ncols=2, frameon=False)
    return figure


def plot(series: dict[str, list[float]], path: str) -> None:
    lag_figure(series).savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--plot", help="write the loop-lag plot (PNG) to this file")
    parser.add_argument("--from-a-thread", help=argparse.SUPPRESS)  # one measurement, as JSON
    args = parser.parse_args()
    if args.from_a_thread:
        make = DoNothing if args.from_a_thread == ALONE else EXECUTORS[args.from_a_thread]
        print(json.dumps(from_a_thread(make, args.tasks)))
        return
    runs: list[dict[str, dict[str, float]]] = []
    series: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        results, series = asyncio.run(measure(args.tasks))
        runs.append(results)
    combined = combine(runs)
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {WORKERS} workers, "
        f"{args.tasks} tasks, {args.repeat} runs"
    )
    print(table(combined))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "machine": platform.platform(),
                    "cpus": os.cpu_count(),
                    "results": combined,
                    "runs": runs,  # each run's own figures, for ratios within a run
                },
                out,
                indent=2,
            )
    if args.plot:
        plot(series, args.plot)


if __name__ == "__main__":
    main()
