import asyncio

from ravyn import Ravyn

from corral import scheduler
from corral.ravyn import SchedulerConfig

app = Ravyn(scheduler_config=SchedulerConfig(enabled=True), enable_scheduler=True)


async def delete_old_records() -> int:
    await asyncio.sleep(0)  # your database call
    return 0


@scheduler(name="cleanup_task", trigger="interval", hours=1)
async def cleanup_old_data() -> None:
    """Run every hour."""
    await delete_old_records()
    print("Cleanup completed")
