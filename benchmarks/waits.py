"""How the waiting side waits: a round trip over a socket pair, blocked in read() or in poll().

    python benchmarks/waits.py [--round-trips 20000] [--repeat 3] [--json FILE]

One child process answers each request on a socket pair; the caller and the child each wait
for the other's message either blocked in ``read()`` on the socket, or in ``poll()`` for it and
then reading. The four combinations are measured in turns within a run, with the caller on one
CPU and the child on the other, as ``pool.py`` places its round trips. corral's workers wait
for jobs, and a caller in ``result()`` waits for its reply, in ``read()`` (``recv``) because of
this table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import select
import statistics
from collections.abc import Callable
from multiprocessing.connection import Connection

from pool import interleaved_round_trips, placed

WAYS = ("read", "poll")
MESSAGE = b"x" * 64


def _waiter(way: str, fd: int) -> Callable[[], object]:
    """What to do before each read: nothing (block in read), or wait in poll()."""
    if way == "read":
        return lambda: None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return poller.poll


def _answer(conn: Connection, way: str) -> None:
    fd = conn.fileno()
    wait = _waiter(way, fd)
    while True:
        wait()
        if not os.read(fd, 4096):
            return
        os.write(fd, MESSAGE)


class Pair:
    """A child answering on a socket pair; ``call`` is one round trip."""

    def __init__(self, caller: str, child: str) -> None:
        context = multiprocessing.get_context("forkserver")
        self.conn, theirs = context.Pipe(duplex=True)
        self.process = context.Process(target=_answer, args=(theirs, child))
        self.process.start()
        theirs.close()
        self.fd = self.conn.fileno()
        self.wait = _waiter(caller, self.fd)

    def call(self) -> None:
        os.write(self.fd, MESSAGE)
        self.wait()
        os.read(self.fd, 4096)

    def close(self) -> None:
        self.conn.close()
        self.process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--round-trips", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    pairs = {
        f"caller in {caller}, child in {child}": Pair(caller, child)
        for caller, child in itertools.product(WAYS, WAYS)
    }
    medians: dict[str, list[float]] = {name: [] for name in pairs}
    cpus = sorted(os.sched_getaffinity(0))  # the caller on the first, the child on the others
    try:
        for _ in range(args.repeat):
            with placed({cpus[0]}, set(cpus[1:]) or {cpus[0]}):
                times = interleaved_round_trips(
                    {name: pair.call for name, pair in pairs.items()}, args.round_trips, rounds=10
                )
            for name, values in times.items():
                medians[name].append(statistics.median(values) * 1e6)
    finally:
        for pair in pairs.values():
            pair.close()
    fastest = min(statistics.median(values) for values in medians.values())
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs; round trip over a socket "
        f"pair, medians of {args.repeat} runs"
    )
    for name, values in medians.items():
        median = statistics.median(values)
        spread = f"{min(values):.1f}-{max(values):.1f}"
        print(f"{name:30} {median:6.1f} us  ({spread})  {median / fastest:4.2f}x")
    if args.json:
        with open(args.json, "w") as out:
            results = {name: {"median_us": values} for name, values in medians.items()}
            json.dump({"machine": platform.platform(), "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
