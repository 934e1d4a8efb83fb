from corral import scheduler


def process_large_dataset() -> None: ...
def sync_with_external_api() -> None: ...
def has_data_changed() -> bool:
    return False


def create_backup() -> None: ...


# Allow up to 3 concurrent instances
@scheduler(name="heavy_task", trigger="interval", minutes=5, max_instances=3)
def heavy_processing() -> None:
    process_large_dataset()


# If runs were missed, execute only once
@scheduler(name="sync", trigger="interval", minutes=10, coalesce=True)
def sync_data() -> None:
    sync_with_external_api()


# Only back up if data changed
@scheduler(name="backup", trigger="cron", hour=3)
def conditional_backup() -> str:
    if has_data_changed():
        create_backup()
        return "backed up"
    print("No changes, skipping backup")
    return "skipped"
