from ravyn import Ravyn

from corral.ravyn import (
    SchedulerConfig,
    SchedulerSettings,  # RavynSettings, with scheduling switched on
)


class AppSettings(SchedulerSettings):
    scheduler_config: SchedulerConfig = SchedulerConfig(
        enabled=True,
        timezone="America/New_York",
        max_instances=3,
    )


app = Ravyn(settings_module=AppSettings)
