import logging

from corral import scheduler

logger = logging.getLogger("app.tasks")


class SyncError(Exception):
    pass


def sync_data() -> None:
    raise SyncError("the partner API is down")


# Good: a reasonable interval
@scheduler(name="health_check", trigger="interval", minutes=5)
def health_check() -> None:
    pass


# Good: handle errors, and give the run a time limit
@scheduler(name="sync", trigger="interval", hours=1, timeout=300)
def sync_with_retry() -> bool:
    try:
        sync_data()
    except SyncError as e:
        logger.error(f"Sync failed: {e}")  # reaches the app's logging, with the task's id
        return False
    return True
