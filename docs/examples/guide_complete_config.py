from ravyn import Ravyn

from corral.ravyn import SchedulerConfig

app = Ravyn(
    scheduler_config=SchedulerConfig(
        enabled=True,
        timezone="UTC",
        max_instances=3,
        coalesce=True,
        # corral's own settings: where tasks run and how the worker pool behaves
        executor="process",
        workers=4,
        timeout=600,
        max_memory="1GiB",
    ),
    enable_scheduler=True,
)
