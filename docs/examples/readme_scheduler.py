"""A standalone scheduler: a CPU-heavy task runs in a worker while the app's loop stays free.

Run it: ``python docs/examples/readme_scheduler.py`` (stops by itself after three reports).
"""

import asyncio
import os

from asyncz.events.constants import TASK_EXECUTED

from corral import Scheduler, SchedulerConfig, scheduler


@scheduler(name="report", trigger="interval", seconds=1, timeout=30)
def build_report() -> str:
    total = sum(i * i for i in range(2_000_000))  # CPU-heavy, in a worker process
    return f"report {total} built in process {os.getpid()}"


async def main() -> None:
    stop = asyncio.Event()
    reports: list[str] = []

    def on_report(event: object) -> None:
        reports.append(str(getattr(event, "return_value", "")))
        if len(reports) == 3:
            stop.set()

    config = SchedulerConfig(enabled=True, workers=2)
    async with Scheduler(config) as running:
        assert running.asyncz is not None
        running.asyncz.add_listener(on_report, TASK_EXECUTED)  # one event per run
        await stop.wait()
    print(f"app process {os.getpid()}")
    print("\n".join(reports))


if __name__ == "__main__":
    asyncio.run(main())
