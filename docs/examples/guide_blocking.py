import os
import time

from corral import scheduler


# Sync and blocking: with corral it runs in a worker process, not in the app's event loop,
# and a run that hangs is stopped by its timeout instead of holding its slot forever.
@scheduler(name="task", trigger="interval", minutes=5, timeout=120)
def blocking_task(seconds: float = 60) -> int:
    time.sleep(seconds)
    return os.getpid()
