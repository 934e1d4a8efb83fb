"""Any ASGI framework: run the scheduler for as long as the app runs (Lilya here)."""

from lilya.apps import Lilya
from lilya.routing import Path

from corral import Scheduler, SchedulerConfig, scheduler


@scheduler(name="refresh-cache", trigger="interval", minutes=10, timeout=60)
def refresh_cache() -> str:
    return "cache refreshed"


tasks = Scheduler(SchedulerConfig(enabled=True, workers=2))


async def health() -> dict[str, int]:
    stats = tasks.statistics()
    return {"workers": 0 if stats is None else len(stats.workers)}


app = Lilya(routes=[Path("/health", health)], lifespan=tasks.lifespan)
# Starlette and FastAPI take the same argument: Starlette(lifespan=tasks.lifespan)
