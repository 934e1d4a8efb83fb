"""Litestar: its ``lifespan`` takes a list, so the scheduler's lifespan goes in one."""

from litestar import Litestar, get

from corral import Scheduler, SchedulerConfig, scheduler


@scheduler(name="rebuild-index", trigger="interval", minutes=10, timeout=60)
def rebuild_index() -> str:
    return "index rebuilt"


tasks = Scheduler(SchedulerConfig(enabled=True, workers=2))


@get("/health")
async def health() -> dict[str, int]:
    stats = tasks.statistics()
    return {"workers": 0 if stats is None else len(stats.workers)}


app = Litestar(route_handlers=[health], lifespan=[tasks.lifespan])
