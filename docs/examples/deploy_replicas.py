"""Two schedulers sharing one database, as two server workers would: each fire runs once.

Run it: ``python docs/examples/deploy_replicas.py`` (about five seconds).
"""

import asyncio
import os
import tempfile

from asyncz.events.constants import TASK_EXECUTED

from corral import Ledger, Scheduler, SchedulerConfig, scheduler


@scheduler(name="heartbeat", trigger="interval", seconds=1)
def heartbeat() -> int:
    return os.getpid()


async def main() -> None:
    folder = tempfile.mkdtemp()
    database = f"sqlite:///{folder}/corral.db"  # one file shared by every process on this host
    config = SchedulerConfig(enabled=True, workers=1, database=database)
    # Both schedule "heartbeat" every second; each fire is claimed by one of them only.
    executed: list[object] = []
    five = asyncio.Event()

    def on_executed(event: object) -> None:  # from whichever scheduler won the fire
        executed.append(event)
        if len(executed) == 5:
            five.set()

    async with Scheduler(config) as first, Scheduler(config) as second:
        for running in (first, second):
            assert running.asyncz is not None
            running.asyncz.add_listener(on_executed, TASK_EXECUTED)
        await five.wait()
    names: dict[str | None, str] = {}
    for stopped in (first, second):
        stats = stopped.ledger_statistics()  # after shutdown: its final counts
        assert stats is not None
        names[stopped.replica_id] = f"scheduler {len(names) + 1}"
        print(
            f"{names[stopped.replica_id]}: won {stats.claims_won}, "
            f"skipped {stats.claims_taken} claimed by the other"
        )
    ledger = Ledger(database)
    for run in reversed(ledger.runs(task="heartbeat")):
        print(
            f"{run.scheduled:%H:%M:%S} {run.status} by {names[run.replica]} "
            f"in worker {run.worker_pid}"
        )
    ledger.close()


if __name__ == "__main__":
    asyncio.run(main())
