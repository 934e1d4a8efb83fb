"""Tasks declared with @scheduler, as an application module would (imported by tests)."""

from __future__ import annotations

import os

from corral import scheduler


@scheduler(name="app-heartbeat", trigger="interval", seconds=0.2)
def heartbeat() -> int:
    return os.getpid()


@scheduler(name="app-async-heartbeat", trigger="interval", seconds=0.2)
async def async_heartbeat() -> int:
    return os.getpid()
