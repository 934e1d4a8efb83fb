"""Drive an ASGI app's lifespan exactly as a server does: startup, run, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any


@contextlib.asynccontextmanager
async def lifespan_of(app: Any, timeout: float = 30) -> AsyncIterator[None]:
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started, stopped = asyncio.Event(), asyncio.Event()
    failures: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind.endswith(".failed"):
            failures.append(message.get("message", kind))
        if kind.startswith("lifespan.startup."):
            started.set()
        if kind.startswith("lifespan.shutdown."):
            stopped.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    server = asyncio.ensure_future(app(scope, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    await asyncio.wait_for(started.wait(), timeout)
    assert not failures, failures
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(stopped.wait(), timeout)
        await asyncio.wait_for(server, timeout)
        assert not failures, failures
