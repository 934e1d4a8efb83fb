"""A task that never ends, without a timeout: only a second signal stops it."""

from __future__ import annotations

import time

from corral import SchedulerConfig, scheduler

scheduler_config = SchedulerConfig(workers=1, mistrigger_grace_time=None, shutdown_timeout=None)


@scheduler(name="cli-forever", trigger="interval", seconds=0.2)
def forever() -> None:
    print("started", flush=True)
    while True:
        time.sleep(0.05)
