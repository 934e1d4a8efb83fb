"""When the app is killed with SIGKILL, nothing it started is left: workers stopped by SIGSTOP,
holding the GIL in C code, or replaced by ``os.execv``; what their jobs started in sessions of
their own and double-forked daemons; and the processes that start workers. No ``/tmp/pymp-*``
directory is left either."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

from conftest import wait_until

PARENT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import worker_jobs
    from corral import Pool

    if __name__ == "__main__":
        d = sys.argv[1]
        pool = Pool(workers=6, start_method=sys.argv[2], kill_grace=0.1)
        pool.start()
        pool.submit(worker_jobs.write_pid_and_hang, d + "/stopped")
        pool.submit(worker_jobs.write_pid_and_hold_the_gil, d + "/gil")
        pool.submit(worker_jobs.write_pid_and_exec, d + "/executed")
        pool.submit(worker_jobs.start_session_child_and_daemon_and_hang, d)
        pool.submit(worker_jobs.write_pid_and_hang, d + "/plain")
        time.sleep(600)  # until it is killed
    """
)

NAMES = ("stopped", "gil", "executed", "session", "daemon", "worker", "plain")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_nothing_is_left_when_the_app_is_killed(start_method: str, tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(PARENT.format(tests=str(Path(__file__).parent)))
    temp = tmp_path / "tmp"  # where multiprocessing would make its /tmp/pymp-* directories
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    app = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), start_method], env=env, start_new_session=True
    )
    pids: list[int] = []
    try:
        files = [tmp_path / name for name in NAMES]
        wait_until(lambda: all(f.exists() for f in files), timeout=60, what="every job to start")
        named = {name: int((tmp_path / name).read_text()) for name in NAMES}
        wait_until(
            lambda: "executed by a job" in " ".join(psutil.Process(named["executed"]).cmdline()),
            what="the job to replace its worker's program",
        )
        os.kill(named["stopped"], signal.SIGSTOP)
        wait_until(
            lambda: psutil.Process(named["stopped"]).status() == psutil.STATUS_STOPPED,
            what="the worker to stop",
        )
        # Everything the app started, and the daemon (whose parent exited) by its pid.
        tree = [p.pid for p in psutil.Process(app.pid).children(recursive=True)]
        pids = sorted({*tree, *named.values()})
        assert all(_alive(pid) for pid in pids)
        app.kill()
        app.wait(10)
        # Gone within about a second; the bound is for a loaded machine.
        wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10, what="no process")
        assert sorted(p.name for p in temp.iterdir()) == []
    finally:
        app.kill()
        app.wait(10)
        for pid in pids:  # a failed run leaves nothing behind either
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
