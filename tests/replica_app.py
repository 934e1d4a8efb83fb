"""A plain ASGI app whose lifespan runs corral's scheduler, for real uvicorn servers."""

from __future__ import annotations

import os
from typing import Any

from corral import Scheduler, SchedulerConfig
from replica_tasks import tick

scheduler = Scheduler(SchedulerConfig(enabled=True, workers=1), tasks=[tick.__corral_task__])  # type: ignore[attr-defined]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        async with scheduler.lifespan(app):
            message = await receive()
            assert message["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})
            print(f"corral-test: scheduler started in {os.getpid()}", flush=True)
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})
