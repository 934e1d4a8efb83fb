"""Ravyn's ``AsynczConfig`` form: only the import changes, and the tasks run in corral's workers."""

from ravyn import Ravyn

# Before: from ravyn.contrib.schedulers.asyncz.config import AsynczConfig
from corral.ravyn import AsynczConfig

scheduler_config = AsynczConfig(
    tasks={
        "collect_market_data": "integration_ravyn_tasks",
        "send_newsletter": "integration_ravyn_tasks",
    },
    timezone="UTC",
    configurations={
        "asyncz.task_defaults.coalesce": True,
        "asyncz.executors.default": {"type": "processpool", "max_workers": 2},
    },
)

app = Ravyn(scheduler_config=scheduler_config, enable_scheduler=True)
