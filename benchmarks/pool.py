"""Pool-level overhead, side by side in one run: corral's pool, the stdlib's, and a raw pipe.

    python benchmarks/pool.py [--jobs 20000] [--latency-jobs 2000] [--repeat 3] [--json FILE]

Measures, on warm pools of 2 workers:
- round trip: one no-op job submitted and its result received, one at a time (median, p99), with
  the caller's threads on one CPU and the worker processes on the others; and on one core (all
  of them on one CPU: what a round trip costs in CPU time);
- throughput: ``--jobs`` no-op jobs submitted at once, until every result is in (jobs/s);
- recovery: from a worker's crash to the next job's result.
Every contender is called from a thread other than the main one, as an app's request threads
call a pool.
The floor is a raw round trip of the same pickled message over a pipe to one child process. For
scale, a round trip between two Python threads (no process at all): the stdlib's pools and loky
hand each job to a thread of their own and back, so they pay that on top of the floor.
The contenders: corral's ``Pool``, the stdlib's ``ProcessPoolExecutor`` and
``multiprocessing.Pool`` (``apply_async(...).get()``), and loky's reusable executor if installed.

Every contender is measured in the same run, in turns, and with the same placement on CPUs: left
to the scheduler, two processes that answer each other run on one CPU or on two by chance, and
the floor alone moves between about 15 and 80 us from one run to the next.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.pool
import os
import pickle
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from queue import SimpleQueue
from typing import Any, TypeVar

import psutil
from bench_jobs import die, ignore_sigterm_and_sleep, noop, noop_arg
from report import combine, p99

from corral import JobTimeoutError, Pool, WorkerDiedError

_T = TypeVar("_T")
WORKERS = 2
MEMORY_JOBS = 100_000
MP = "multiprocessing.Pool"


def _echo_server(conn: Connection) -> None:
    while True:
        frame = conn.recv_bytes()
        if not frame:
            return
        pickle.loads(frame)
        conn.send_bytes(pickle.dumps((2, pickle.dumps(None))))


class RawPipe:
    """The floor: one child answering one pickled frame per request."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("forkserver")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_echo_server, args=(child,))
        self.process.start()
        child.close()

    def call(self) -> None:
        self.conn.send_bytes(pickle.dumps(("__main__:noop", (), {})))
        reply = pickle.loads(self.conn.recv_bytes())
        pickle.loads(reply[1])

    def close(self) -> None:
        self.conn.send_bytes(b"")
        self.process.join()


class ThreadHandOff:
    """A request to a helper thread and its answer back: two hand-offs between Python threads."""

    def __init__(self) -> None:
        self.requests: SimpleQueue[Future[None] | None] = SimpleQueue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (future := self.requests.get()) is not None:
            future.set_result(None)

    def call(self) -> None:
        future: Future[None] = Future()
        self.requests.put(future)
        future.result()

    def close(self) -> None:
        self.requests.put(None)
        self.thread.join()


def round_trips(call: Callable[[], Any], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def throughput(submit: Callable[[], Any], wait: Callable[[list[Any]], object], count: int) -> float:
    start = time.perf_counter()
    futures = [submit() for _ in range(count)]
    wait(futures)
    return count / (time.perf_counter() - start)


def mp_pool() -> multiprocessing.pool.Pool:
    pool = multiprocessing.get_context("forkserver").Pool(WORKERS)
    pool.map(noop_arg, range(WORKERS * 4))  # warm: every worker started
    return pool


def corral_pool() -> Pool:
    pool = Pool(workers=WORKERS, start_method="forkserver", preload=("bench_jobs",))
    pool.start()
    pool.wait_ready(60)
    return pool


def stdlib_pool() -> ProcessPoolExecutor:
    pool = ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("forkserver"))
    list(pool.map(noop_arg, range(WORKERS * 4)))  # warm: every worker started
    return pool


def recovery_corral() -> float:
    with Pool(workers=1, start_method="forkserver", preload=("bench_jobs",)) as pool:
        pool.wait_ready(60)
        pool.submit(noop).result()
        start = time.perf_counter()
        crashed = pool.submit(die)
        following = pool.submit(noop)
        with contextlib.suppress(WorkerDiedError):
            crashed.result()
        following.result()
        return time.perf_counter() - start


def recovery_stdlib() -> float:
    """The stdlib pool breaks: the caller must notice and build a new one."""
    pool = stdlib_pool()
    start = time.perf_counter()
    crashed = pool.submit(die)
    with contextlib.suppress(BrokenProcessPool):
        crashed.result()
    pool.shutdown(wait=True)
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
    pool.submit(noop).result()
    elapsed = time.perf_counter() - start
    pool.shutdown()
    return elapsed


def timeout_precision(timeout: float = 0.5, grace: float = 0.2) -> float:
    """Seconds between the kill deadline (timeout + kill_grace) and the job's outcome."""
    with Pool(workers=1, start_method="forkserver", kill_grace=grace) as pool:
        pool.wait_ready(60)
        pool.submit(noop).result()
        begin = time.perf_counter()
        future = pool.submit(ignore_sigterm_and_sleep, timeout=timeout)
        with contextlib.suppress(JobTimeoutError):
            future.result()
        return time.perf_counter() - begin - timeout - grace


def cold_start(kind: str) -> float:
    """From creating a pool to its first job's result."""
    begin = time.perf_counter()
    if kind == "corral":
        with Pool(workers=WORKERS, start_method="forkserver") as pool:
            pool.submit(noop).result()
    elif kind == "stdlib":
        with ProcessPoolExecutor(
            WORKERS, mp_context=multiprocessing.get_context("forkserver")
        ) as ex:
            ex.submit(noop).result()
    else:
        executor = _loky_executor()
        executor.submit(noop).result()
        executor.shutdown(wait=True, kill_workers=True)
    return time.perf_counter() - begin


def _loky_executor() -> Any:
    from loky import get_reusable_executor

    return get_reusable_executor(max_workers=WORKERS, reuse=False)


def memory(jobs: int) -> dict[str, float]:
    """Idle worker RSS, and the parent's RSS and open descriptors before and after ``jobs``."""
    me = psutil.Process()
    with Pool(workers=WORKERS, start_method="forkserver") as pool:
        pool.wait_ready(60)
        for _ in range(WORKERS * 50):
            pool.submit(noop).result()
        worker_rss = min(w.rss or 0 for w in pool.statistics().workers)
        rss_before, fds_before = me.memory_info().rss, me.num_fds()
        done = 0
        while done < jobs:
            batch = [pool.submit(noop) for _ in range(min(1000, jobs - done))]
            for future in batch:
                future.result()
            done += len(batch)
        rss_after, fds_after = me.memory_info().rss, me.num_fds()
    bare = subprocess.Popen(
        [sys.executable, "-c", "import corral._pool._worker, sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    time.sleep(1.0)  # let the interpreter settle before reading its RSS
    bare_rss = psutil.Process(bare.pid).memory_info().rss
    bare.communicate(b"")
    return {
        "idle_worker_rss_mib": worker_rss / 2**20,
        "bare_interpreter_rss_mib": bare_rss / 2**20,
        "parent_rss_growth_mib": (rss_after - rss_before) / 2**20,
        "parent_fds_before": fds_before,
        "parent_fds_after": fds_after,
    }


@contextlib.contextmanager
def placed(parent_cpus: set[int], child_cpus: set[int]) -> Iterator[None]:
    """Run the block with this process's threads on ``parent_cpus`` and every process it
    started on ``child_cpus``; then let all of them run anywhere again."""
    me = psutil.Process()
    everywhere = os.sched_getaffinity(0)
    children = me.children(recursive=True)

    def place(mine: set[int], theirs: set[int]) -> None:
        for thread in me.threads():
            os.sched_setaffinity(thread.id, mine)
        for child in children:
            with contextlib.suppress(OSError, psutil.Error):  # it exited meanwhile
                os.sched_setaffinity(child.pid, theirs)

    try:
        place(parent_cpus, child_cpus)
        yield
    finally:
        place(everywhere, everywhere)


def interleaved_round_trips(
    calls: dict[str, Callable[[], Any]], count: int, rounds: int = 5
) -> dict[str, list[float]]:
    """``count`` round trips of each call, in ``rounds`` blocks taken in turn, so that every
    contender meets the machine in the same states."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name] += round_trips(call, count // rounds)
    return times


def measure(latency_jobs: int, jobs: int) -> dict[str, dict[str, float]]:
    raw = RawPipe()
    handoff = ThreadHandOff()
    pool = corral_pool()
    executor = stdlib_pool()
    mp = mp_pool()
    calls: dict[str, Callable[[], Any]] = {
        "raw pipe (floor)": raw.call,
        "thread hand-off (for scale)": handoff.call,
        "corral Pool": lambda: pool.submit(noop).result(),
        "stdlib ProcessPoolExecutor": lambda: executor.submit(noop).result(),
        MP: lambda: mp.apply_async(noop).get(),
    }
    loky: Any = None
    with contextlib.suppress(ImportError):
        loky = _loky_executor()
        list(loky.map(noop_arg, range(WORKERS * 4)))
        calls["loky (reusable executor)"] = lambda: loky.submit(noop).result()
    for call in calls.values():
        round_trips(call, 200)  # warm

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        with placed({cpus[0]}, set(cpus[1:])):
            apart = interleaved_round_trips(calls, latency_jobs)
    else:
        apart = interleaved_round_trips(calls, latency_jobs)
    with placed({cpus[0]}, {cpus[0]}):
        together = interleaved_round_trips(calls, latency_jobs)
    results: dict[str, dict[str, float]] = {
        name: {
            **_latency(apart[name]),
            "one_core_median_us": statistics.median(together[name]) * 1e6,
        }
        for name in calls
    }
    floor = results["raw pipe (floor)"]
    mp_row = results[MP]
    for row in results.values():  # ratios within this run
        row["vs_floor"] = row["median_us"] / floor["median_us"]
        row["one_core_vs_floor"] = row["one_core_median_us"] / floor["one_core_median_us"]
        row["vs_mp"] = row["median_us"] / mp_row["median_us"]
        row["one_core_vs_mp"] = row["one_core_median_us"] / mp_row["one_core_median_us"]

    def wait(futures: list[Any]) -> None:
        for future in futures:
            future.result()

    results["corral Pool"]["throughput"] = throughput(lambda: pool.submit(noop), wait, jobs)
    results["stdlib ProcessPoolExecutor"]["throughput"] = throughput(
        lambda: executor.submit(noop), wait, jobs
    )

    def wait_mp(pending: list[Any]) -> None:
        for result in pending:
            result.get()

    results[MP]["throughput"] = throughput(lambda: mp.apply_async(noop), wait_mp, jobs)
    if loky is not None:
        results["loky (reusable executor)"]["throughput"] = throughput(
            lambda: loky.submit(noop), wait, jobs
        )
        loky.shutdown(wait=True, kill_workers=True)
    raw.close()
    handoff.close()
    pool.shutdown()
    executor.shutdown()
    mp.close()
    mp.join()
    for row in results.values():
        if "throughput" in row:
            row["throughput_vs_mp"] = row["throughput"] / results[MP]["throughput"]

    results["corral Pool"]["recovery"] = recovery_corral()
    results["stdlib ProcessPoolExecutor"]["recovery"] = recovery_stdlib()
    for name, kind in (
        ("corral Pool", "corral"),
        ("stdlib ProcessPoolExecutor", "stdlib"),
        ("loky (reusable executor)", "loky"),
    ):
        if name in results:
            results[name]["cold_start"] = cold_start(kind)
    results["corral Pool"]["timeout_overshoot"] = timeout_precision()
    results["corral Pool"].update(memory(MEMORY_JOBS))
    return results


def _latency(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_us": statistics.median(ordered) * 1e6,
        "p99_us": p99(ordered) * 1e6,
    }


def table(combined: dict[str, dict[str, list[float]]]) -> str:
    stdlib = combined["stdlib ProcessPoolExecutor"]
    lines = [
        f"{'':28} {'round trip median':>20} {'p99':>10} {'vs stdlib':>10} {'vs floor':>9} "
        f"{'vs mp.Pool':>11} {'one core':>9} {'vs floor':>9} {'jobs/s':>9} {'vs stdlib':>10} "
        f"{'vs mp.Pool':>11} {'recovery':>10}"
    ]
    for name, m in combined.items():
        med = m["median_us"][0]
        one = m["one_core_median_us"][0]
        row = f"{name:28} {med:>14.1f} us   {m['p99_us'][0]:>7.1f} us"
        row += f" {med / stdlib['median_us'][0]:>9.2f}x {m['vs_floor'][0]:>8.2f}x"
        row += f" {m['vs_mp'][0]:>10.2f}x"
        row += f" {one:>6.1f} us {m['one_core_vs_floor'][0]:>8.2f}x"
        if "throughput" in m:
            tput = m["throughput"]
            row += f" {tput[0]:>9.0f} {tput[0] / stdlib['throughput'][0]:>9.2f}x"
            row += f" {m['throughput_vs_mp'][0]:>10.2f}x"
        if "recovery" in m:
            row += f" {m['recovery'][0] * 1000:>7.1f} ms"
        if "cold_start" in m:
            row += f"  cold start {m['cold_start'][0] * 1000:.0f} ms"
        lines.append(row)
    corral = combined["corral Pool"]
    lines.append(
        f"corral: timeout kill overshoot (job ignores SIGTERM, timeout 0.5 s + kill_grace 0.2 s): "
        f"{corral['timeout_overshoot'][0] * 1000:.1f} ms"
    )
    lines.append(
        f"corral: idle worker RSS {corral['idle_worker_rss_mib'][0]:.1f} MiB (bare interpreter "
        f"importing the worker module: {corral['bare_interpreter_rss_mib'][0]:.1f} MiB); parent "
        f"RSS growth over {MEMORY_JOBS} jobs {corral['parent_rss_growth_mib'][0]:.1f} MiB; "
        f"open fds {corral['parent_fds_before'][0]:.0f} -> {corral['parent_fds_after'][0]:.0f}"
    )
    lines.append(
        f"corral vs {MP}: round trip {corral['vs_mp'][0]:.2f}x, one core "
        f"{corral['one_core_vs_mp'][0]:.2f}x, throughput {corral['throughput_vs_mp'][0]:.2f}x"
    )
    lines.append(
        "round trips: caller on one CPU, worker processes on the others (every contender, in "
        "turns); one core: all of them on one CPU; 'vs floor', 'vs mp.Pool': the median of the "
        "ratios within each run; medians of the repeated runs; min-max ranges are in the JSON "
        "output"
    )
    return "\n".join(lines)


def on_a_caller_thread(function: Callable[..., _T], *args: Any) -> _T:
    """``function(*args)`` on a thread of its own, as an app's request threads call a pool (the
    main thread, where signal handlers run, never reads a reply itself: docs/tuning.md)."""
    result: list[_T] = []
    caller = threading.Thread(target=lambda: result.append(function(*args)), name="caller")
    caller.start()
    caller.join()
    if not result:
        raise RuntimeError("the measurement failed on its thread (its traceback is above)")
    return result[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--latency-jobs", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    runs = [on_a_caller_thread(measure, args.latency_jobs, args.jobs) for _ in range(args.repeat)]
    combined = combine(runs)
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {WORKERS} workers")
    print(table(combined))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                # each run's own figures too, for ratios within a run
                {"machine": platform.platform(), "results": combined, "runs": runs},
                out,
                indent=2,
            )


if __name__ == "__main__":
    main()
