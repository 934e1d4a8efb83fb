from ravyn import Ravyn

from corral.ravyn import SchedulerConfig

app = Ravyn(
    scheduler_config=SchedulerConfig(enabled=True),
    enable_scheduler=True,  # Ravyn starts a scheduler only when this flag is set
)
