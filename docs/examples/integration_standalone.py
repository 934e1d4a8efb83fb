"""A script or a worker service without a web app: run until Ctrl-C or SIGTERM."""

import asyncio
import logging

from corral import Scheduler, SchedulerConfig, scheduler

log = logging.getLogger("nightly")


@scheduler(name="nightly-export", trigger="cron", hour=1, minute=30, timeout=3600)
def nightly_export() -> None:
    log.info("exporting")


async def main() -> None:
    await Scheduler(SchedulerConfig(enabled=True, workers=2)).run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main())
