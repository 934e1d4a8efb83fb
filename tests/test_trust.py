"""Trust boundaries: the parent-worker channel is private, workers hold only what they need."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

import jobs
from conftest import PoolFactory, assert_gone, wait_until


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


GRANDPARENT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import jobs
    from corral import Pool

    if __name__ == "__main__":
        pool = Pool(workers=2, start_method={method!r})
        pool.start()
        pool.submit(jobs.spawn_child_and_hang, {d!r} + "/child-a")
        pool.submit(jobs.spawn_child_and_hang, {d!r} + "/child-b")
        time.sleep(600)
    """
)


def test_grandchildren_die_with_the_workers_when_the_parent_is_killed(
    start_method: str, tmp_path: Path
) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        GRANDPARENT.format(tests=str(Path(__file__).parent), method=start_method, d=str(tmp_path))
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL)
    try:
        files = [tmp_path / "child-a", tmp_path / "child-b"]
        wait_until(lambda: all(f.exists() and f.read_text() for f in files), timeout=30)
        children = [int(f.read_text()) for f in files]
        workers = [psutil.Process(pid).ppid() for pid in children]
        parent.kill()
        parent.wait(10)
        assert_gone(workers + children, timeout=3)
    finally:
        parent.kill()
        parent.wait(10)
