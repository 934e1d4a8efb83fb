"""Tasks declared with Ravyn's own ``@scheduler``, as a Ravyn application declares them."""

from __future__ import annotations

import os

from asyncz.triggers import IntervalTrigger
from ravyn.contrib.schedulers.asyncz.decorator import scheduler


def every() -> IntervalTrigger:
    return IntervalTrigger(seconds=0.2)  # type: ignore[arg-type]  # asyncz types it int


@scheduler(name="ravyn-collect", trigger=every(), max_instances=2)
def collect() -> int:
    return os.getpid()


@scheduler(name="ravyn-async-collect", trigger=every())
async def async_collect() -> int:
    return os.getpid()


# "pool" is an executor alias that the app's AsynczConfig(configurations=...) defines
@scheduler(name="ravyn-pooled", trigger=every(), executor="pool")
def pooled() -> int:
    return os.getpid()


@scheduler(name="ravyn-off", trigger=every(), is_enabled=False)
def switched_off() -> None:
    raise AssertionError("a task with is_enabled=False ran")
