"""What exactly-once across replicas costs: claims per fire, a cluster under load, idle queries.

    python benchmarks/ledger.py [--postgres URL] [--seconds 60] [--json out.json]

1. Claim overhead: the time one fire's claim takes (one transaction), SQLite and PostgreSQL,
   next to what a fire costs without a database (nothing: the pool's submit).
2. 3 replicas x 50 tasks at 1-s intervals for ``--seconds``: three real ``corral run``
   processes sharing the database; every task appends a line per run. Duplicates (a fire run
   twice), missed fires (due in the window, not run) and skipped ones are counted.
3. Idle cost: database transactions per second of a replica with no fire due.
4. Event latency: from a fire's due time to its outcome event (a no-op task, one fire every
   20 ms), without a database and with each: the claim before the run, and the outcome's write
   before its event.

PostgreSQL is measured when ``--postgres`` (or ``CORRAL_TEST_POSTGRES``) gives a server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bench_jobs
from asyncz.events.constants import TASK_EXECUTED
from report import p99
from sqlalchemy import create_engine, text

from corral import Scheduler, SchedulerConfig
from corral._ledger import Coordinator, Ledger
from corral._ledger._records import ClaimRequest

HERE = Path(__file__).resolve().parent
TASKS = 50

TASK_HEADER = """import os, time
from corral import scheduler


def _run(name):
    with open(os.environ["BENCH_OUT"], "a") as out:
        out.write(f"{name} {time.time():.6f}\\n")
"""
TASK = """

@scheduler(name="{name}", trigger="interval", seconds=1)
def {name}():
    _run("{name}")
"""


def fresh(kind: str, folder: Path, postgres: str | None) -> str:
    if kind == "sqlite":
        path = folder / f"bench-{time.monotonic_ns()}.db"
        return f"sqlite:///{path}"
    assert postgres is not None
    engine = create_engine(postgres.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS corral_runs, corral_replicas"))
    engine.dispose()
    return postgres


def claim_overhead(url: str, fires: int = 2000) -> float:
    """Microseconds per claimed fire (one transaction each)."""
    ledger = Ledger(url)
    ledger.join()
    start = datetime(2030, 1, 1, tzinfo=UTC)
    began = time.perf_counter()
    for second in range(fires):
        ledger.claim("bench", [start + timedelta(seconds=second)], max_instances=10**6)
    took = time.perf_counter() - began
    ledger.close()
    return took / fires * 1e6


def batched_claim_overhead(url: str, seconds: int = 40) -> float:
    """Microseconds per fire when 50 tasks are due at once (claimed in one transaction, as the
    coordinator does with everything queued together)."""
    ledger = Ledger(url)
    ledger.join()
    start = datetime(2031, 1, 1, tzinfo=UTC)
    began = time.perf_counter()
    for second in range(seconds):
        moment = [start + timedelta(seconds=second)]
        ledger.claim_many([ClaimRequest(f"t{n:02d}", moment, 1) for n in range(TASKS)])
    took = time.perf_counter() - began
    ledger.close()
    return took / (seconds * TASKS) * 1e6


def idle_queries(url: str, seconds: float) -> float:
    """Transactions per second of one idle replica (default lease)."""
    ledger = Ledger(url)
    coordinator = Coordinator(ledger, on_lost=lambda lost: None)
    coordinator.start()
    before = ledger.queries
    began = time.monotonic()
    time.sleep(seconds)
    rate = (ledger.queries - before) / (time.monotonic() - began)
    coordinator.stop()
    return rate


def event_latency(url: str | None, count: int = 200) -> dict[str, float]:
    """Milliseconds from each fire's due time to its outcome event (median and p99)."""
    return asyncio.run(_event_latency(url, count))


async def _event_latency(url: str | None, count: int) -> dict[str, float]:
    config = SchedulerConfig(enabled=True, workers=2, database=url, mistrigger_grace_time=60)
    sched = Scheduler(config)
    first = datetime.now(UTC) + timedelta(seconds=3)  # once the workers are up
    for i in range(count):
        due = first + timedelta(milliseconds=20 * i)
        sched.add_task(bench_jobs.noop, trigger="date", run_date=due, name=f"latency-{i}")
    late: list[float] = []
    done = asyncio.Event()

    def arrived(event: Any) -> None:
        late.append(time.time() - event.scheduled_run_time.timestamp())
        if len(late) >= count:
            done.set()

    async with sched:
        assert sched.asyncz is not None
        sched.asyncz.add_listener(arrived, TASK_EXECUTED)
        await asyncio.wait_for(done.wait(), 300)
    late.sort()
    return {"event_p50_ms": late[len(late) // 2] * 1000, "event_p99_ms": p99(late) * 1000}


def cluster(url: str, folder: Path, seconds: float) -> dict[str, float]:
    """3 replicas x 50 one-second tasks: duplicates, missed and skipped fires."""
    module = folder / "bench_tasks.py"
    module.write_text(TASK_HEADER + "".join(TASK.format(name=f"t{n:02d}") for n in range(TASKS)))
    out = folder / f"out-{time.monotonic_ns()}.txt"
    out.touch()
    env = {**os.environ, "BENCH_OUT": str(out), "PYTHONPATH": str(folder)}
    command = [sys.executable, "-m", "corral", "run", str(module), "--plain", "--workers", "2"]
    command += ["--database", url, "--duration", str(seconds)]
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(3)
    ]
    for proc in procs:
        proc.wait()
    ledger = Ledger(url)
    runs = ledger.runs(limit=None)
    ledger.close()
    ran = Counter(line.split()[0] for line in out.read_text().splitlines())
    # The window every replica was up: from the latest first claim of a replica to the
    # earliest last one, a second inside each end.
    by_replica: dict[str, list[datetime]] = {}
    for run in runs:
        by_replica.setdefault(run.replica, []).append(run.scheduled)
    first = max(min(times) for times in by_replica.values()) + timedelta(seconds=1)
    last = min(max(times) for times in by_replica.values()) - timedelta(seconds=1)
    due = {
        (f"t{n:02d}", first + timedelta(seconds=s))
        for n in range(TASKS)
        for s in range(int((last - first).total_seconds()) + 1)
    }
    executed = Counter((r.task, r.scheduled) for r in runs if r.status == "executed")
    statuses = Counter(r.status for r in runs)
    return {
        "fires_due": len(due),
        "runs_recorded": len(runs),
        "task_lines": sum(ran.values()),
        "duplicates": sum(count - 1 for count in executed.values() if count > 1)
        + max(0, sum(ran.values()) - statuses["executed"]),
        "missed": len([fire for fire in due if fire not in executed]),
        "skipped": statuses["skipped"],
        "replicas_claiming": len({r.replica for r in runs}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--postgres", default=os.environ.get("CORRAL_TEST_POSTGRES"))
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--json")
    args = parser.parse_args()
    kinds = ["sqlite"] + (["postgresql"] if args.postgres else [])
    results: dict[str, dict[str, Any]] = {"none": event_latency(None)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for kind in kinds:
            results[kind] = {
                "claim_us": claim_overhead(fresh(kind, folder, args.postgres)),
                "batched_claim_us": batched_claim_overhead(fresh(kind, folder, args.postgres)),
                "idle_queries_per_s": idle_queries(fresh(kind, folder, args.postgres), 10),
                **cluster(fresh(kind, folder, args.postgres), folder, args.seconds),
                **event_latency(fresh(kind, folder, args.postgres)),
            }
    header = ["database", "claim µs/fire", "50 at once µs/fire", "idle tx/s", "fires due"]
    header += ["duplicates", "missed"]
    header += ["skipped", "replicas claiming", "event p50 ms", "event p99 ms"]
    print(" | ".join(header))
    for kind, row in results.items():
        if kind == "none":
            print(" | ".join(["no database", *["-"] * 8, *_latency(row)]))
            continue
        cells = [
            kind,
            f"{row['claim_us']:.0f}",
            f"{row['batched_claim_us']:.0f}",
            f"{row['idle_queries_per_s']:.2f}",
            str(row["fires_due"]),
            str(row["duplicates"]),
            str(row["missed"]),
            str(row["skipped"]),
            str(row["replicas_claiming"]),
            *_latency(row),
        ]
        print(" | ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _latency(row: dict[str, Any]) -> list[str]:
    return [f"{row['event_p50_ms']:.1f}", f"{row['event_p99_ms']:.1f}"]


if __name__ == "__main__":
    main()
