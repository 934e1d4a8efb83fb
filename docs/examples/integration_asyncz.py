"""Plain asyncz: corral's ProcessExecutor in place of asyncz's ProcessPoolExecutor."""

import asyncio
import os

from asyncz.events.constants import TASK_EXECUTED
from asyncz.schedulers import AsyncIOScheduler

from corral import ProcessExecutor


def where() -> int:
    return os.getpid()


async def main() -> list[int]:
    done = asyncio.Event()
    pids: list[int] = []

    def on_executed(event: object) -> None:
        pids.append(getattr(event, "return_value", 0))
        done.set()

    scheduler = AsyncIOScheduler(
        executors={
            # an instance, or in dict form: {"class": "corral:ProcessExecutor", "workers": 2}
            "default": ProcessExecutor(workers=2, timeout=60, max_memory="512MiB"),
        }
    )
    scheduler.add_listener(on_executed, TASK_EXECUTED)
    scheduler.add_task(where, trigger="interval", seconds=1, id="where")
    scheduler.start()
    await done.wait()
    scheduler.shutdown()
    return pids


if __name__ == "__main__":
    print(f"app {os.getpid()}, task ran in {asyncio.run(main())[0]}")
