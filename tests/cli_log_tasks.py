"""Tasks that log, print and fail, for the ``corral run`` output tests."""

from __future__ import annotations

import logging
import os
import sys

from corral import SchedulerConfig, scheduler

scheduler_config = SchedulerConfig(workers=1, mistrigger_grace_time=None, shutdown_timeout=None)
log = logging.getLogger("cli_log_tasks")
LONG = "x" * 150


@scheduler(name="talks", trigger="interval", seconds=0.3)
def talks() -> int:
    log.info("hello from the worker")
    log.warning("careful in %d", os.getpid())
    print("printed on stdout")
    print("printed on stderr", file=sys.stderr)
    return os.getpid()


@scheduler(name="fails", trigger="interval", seconds=0.3)
def fails() -> None:
    raise ValueError(f"broken beyond repair {LONG} end-of-detail")


@scheduler(name="in-thread", trigger="interval", seconds=0.3, executor="thread")
def in_thread() -> None:
    log.info("logged in a thread")
    print("printed in a thread")


@scheduler(name="on-loop", trigger="interval", seconds=0.3, executor="asyncio")
async def on_loop() -> None:
    log.info("logged on the event loop")
