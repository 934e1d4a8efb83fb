"""The Dask page: its example runs tasks on a local Dask cluster with the pool's outcomes."""

from __future__ import annotations

import re

import pytest

from test_docs import run_example


@pytest.mark.timeout(300)  # a cluster of spawned processes that import Dask: slow on a busy machine
def test_dask_cluster_example_reports_values_exceptions_and_timeouts() -> None:
    out = run_example("dask_cluster.py", timeout=240)
    assert re.search(r"^cluster tcp://127\.0\.0\.1:\d+: 2 workers ready$", out, re.M)
    app_pid = int(re.findall(r"app process (\d+)", out)[0])
    worker_pid = int(re.findall(r"^rollup: rollup \d+ in process (\d+)$", out, re.M)[0])
    assert worker_pid != app_pid
    assert "import-feed: ValueError: the feed is empty today" in out
    assert re.search(
        r"^stuck: JobTimeoutError: run \d+ \(__main__:stuck\) ran past its timeout of 1s on Dask "
        r"worker tcp://127\.0\.0\.1:\d+; that worker \(pid \d+\) was restarted by its nanny$",
        out,
        re.M,
    )
