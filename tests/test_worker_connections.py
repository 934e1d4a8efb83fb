"""No other process can make the pool run code: nothing the app starts listens for connections
(workers come from a fork server reached over a socket pair only the app holds). A separate
process that finds a listening socket among the app's processes tries to have it run a command,
speaking the protocol of ``multiprocessing``'s forkserver."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

import jobs
from conftest import PoolFactory

ATTACK = textwrap.dedent(
    """
    import array, os, pickle, select, socket, sys

    address, marker = sys.argv[1], sys.argv[2]

    class Command:
        def __reduce__(self):
            return (os.system, ("touch " + marker,))

    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(address.replace("@", "\\0", 1) if address.startswith("@") else address)
        child_r, parent_w = os.pipe()
        parent_r, child_w = os.pipe()
        fds = array.array("i", [child_r, child_w, child_r, child_r])
        client.sendmsg([bytes([len(fds)])], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        os.write(parent_w, pickle.dumps(Command()))
        os.close(parent_w)
        os.close(child_w)
        # The forkserver writes the pid of the child it forked, then its exit status.
        while select.select([parent_r], [], [], 30)[0] and os.read(parent_r, 64):
            pass
    print("attacked", address)
    """
)

_ACCEPTING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix: a listening socket


def listening_unix_sockets(pids: list[int]) -> list[str]:
    """The addresses of the Unix sockets these processes have open that listen."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    found = []
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[6]) in inodes and int(fields[3], 16) & _ACCEPTING:
                found.append(fields[7] if len(fields) > 7 else "<unnamed>")
    return found


def test_no_other_process_can_connect_and_have_code_run(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=2)
    assert pool.submit(jobs.add, 1, 2).result(30) == 3
    me = psutil.Process()
    processes = [me.pid] + [p.pid for p in me.children(recursive=True)]
    assert {w.pid for w in pool.statistics().workers} <= set(processes)
    listening = listening_unix_sockets(processes)
    marker = tmp_path / "ran"
    for address in listening:
        subprocess.run(
            [sys.executable, "-c", ATTACK, address, str(marker)],
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert not marker.exists(), f"code was run through {listening}"
    assert listening == []
