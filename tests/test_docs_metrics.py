"""The operations page's metrics example: an app's registry scraped over HTTP shows corral's
runs, workers and loop lag."""

from __future__ import annotations

import re

from test_docs import run_example


def test_metrics_example_scrapes_corral_s_metrics_from_the_app_s_registry() -> None:
    out = run_example("metrics_app.py")
    runs = re.search(
        r'^corral_runs_total\{outcome="completed",task="report"\} (\d+)\.0$', out, re.M
    )
    assert runs and int(runs[1]) >= 1
    assert re.search(r'^corral_run_duration_seconds_count\{task="report"\} [1-9]', out, re.M)
    assert re.search(r'^corral_run_queue_wait_seconds_count\{task="report"\} [1-9]', out, re.M)
    workers = re.findall(r'^corral_workers\{state="(\w+)"\} (\d)\.0$', out, re.M)
    assert {state for state, _ in workers} == {"starting", "idle", "busy", "stopping", "killing"}
    assert sum(int(count) for _, count in workers) == 2  # workers=2
    assert re.search(r"^corral_worker_restarts_total 0\.0$", out, re.M)
    assert re.search(r"^corral_event_loop_lag_seconds \d", out, re.M)
