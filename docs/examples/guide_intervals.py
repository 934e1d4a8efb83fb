from corral import scheduler


def sync_with_api() -> None: ...
def create_backup() -> None: ...
def cleanup() -> None: ...


# Every 30 minutes
@scheduler(name="sync", trigger="interval", minutes=30)
async def sync_data() -> None:
    sync_with_api()


# Every 2 hours
@scheduler(name="backup", trigger="interval", hours=2)
async def backup_database() -> None:
    create_backup()


# Every day
@scheduler(name="cleanup", trigger="interval", days=1)
async def daily_cleanup() -> None:
    cleanup()
