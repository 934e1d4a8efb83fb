"""The page on several workers or replicas: its example runs each fire once between two
schedulers sharing a database."""

from __future__ import annotations

import re
from collections import Counter

from test_docs import run_example


def test_deploy_replicas_example_runs_each_fire_once_between_two_schedulers() -> None:
    out = run_example("deploy_replicas.py", timeout=120)
    won = {name: int(count) for name, count in re.findall(r"(scheduler \d): won (\d+)", out)}
    assert set(won) == {"scheduler 1", "scheduler 2"}
    fires = re.findall(r"^(\d\d:\d\d:\d\d) executed by (scheduler \d) in worker \d+$", out, re.M)
    assert len(fires) >= 5  # the example runs until five fires have run
    assert max(Counter(time for time, _ in fires).values()) == 1  # never both
    assert sum(won.values()) >= len(fires)
