"""Tasks declared with Ravyn's own ``@scheduler``, left as they are."""

import os

from asyncz.triggers import CronTrigger, IntervalTrigger
from ravyn.contrib.schedulers.asyncz.decorator import scheduler


@scheduler(name="collect-market-data", trigger=IntervalTrigger(hours=12), max_instances=3)
def collect_market_data() -> str:
    return f"collected in process {os.getpid()}"  # a worker process, under corral


@scheduler(name="send-newsletter", trigger=CronTrigger(day_of_week="mon", hour=9))
async def send_newsletter() -> str:
    return "sent"
