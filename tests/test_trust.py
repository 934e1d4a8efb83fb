"""Trust boundaries: the parent-worker channel is private, workers hold only what they need."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

import jobs
from conftest import PoolFactory


def test_workers_do_not_inherit_the_parents_descriptors(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    with open(secret, "w") as handle:
        os.set_inheritable(handle.fileno(), True)  # even one marked inheritable stays home
        pool = make_pool(workers=1)
        descriptors = pool.submit(jobs.open_descriptors).result(30)
    targets = [entry.split(" ", 1)[1] for entry in descriptors]
    assert str(secret) not in targets
    # stdin/stdout/stderr, the private channel, and what the interpreter itself opens
    sockets = [t for t in targets if t.startswith("socket:")]
    assert len(sockets) <= 2, descriptors
    assert len(descriptors) <= 10, descriptors


def test_nothing_listens_for_connections(make_pool: PoolFactory) -> None:
    pool = make_pool(workers=2)
    pool.submit(jobs.noop).result(30)
    processes = [psutil.Process()] + [psutil.Process(w.pid) for w in pool.statistics().workers]
    for process in processes:
        listening = [c for c in process.net_connections(kind="all") if c.status == "LISTEN"]
        assert listening == [], (process.pid, listening)
