"""A task module for the ``corral`` command's tests."""

from __future__ import annotations

import os
import time

from corral import SchedulerConfig, scheduler

scheduler_config = SchedulerConfig(workers=1, mistrigger_grace_time=None, shutdown_timeout=None)


@scheduler(name="cli-tick", trigger="interval", seconds=0.3)
def tick() -> int:
    return os.getpid()


@scheduler(name="cli-nightly", trigger="cron", hour=2, minute=30)
def nightly() -> None:
    pass


@scheduler(name="cli-stuck", trigger="interval", seconds=0.5, is_enabled=False)
def stuck() -> None:
    while True:
        time.sleep(0.05)
