"""An ASGI app whose lifespan runs corral's scheduler, served by a real uvicorn process in
``tests/test_shutdown.py``: one task of a minute, started at once, and a long drain allowed."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import shutdown_tasks
from corral import Scheduler, SchedulerConfig

logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")

scheduler = Scheduler(
    SchedulerConfig(enabled=True, workers=1, mistrigger_grace_time=None, shutdown_timeout=120),
    tasks=[],
)
scheduler.add_task(
    shutdown_tasks.long_task, trigger="date", run_date=datetime.now(UTC), name="long"
)
lifespan = scheduler.lifespan


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()  # lifespan.startup
        async with lifespan(app):
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})
