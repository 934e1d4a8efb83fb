from corral import scheduler


def backup_database() -> None: ...
def generate_report() -> None: ...
def process_billing() -> None: ...


# Every day at 3:00 AM
@scheduler(name="nightly-backup", trigger="cron", hour=3, minute=0)
def nightly_backup() -> None:
    backup_database()


# Every Monday at 9:00 AM
@scheduler(name="report", trigger="cron", day_of_week="mon", hour=9)
def weekly_report() -> None:
    generate_report()


# Every 1st of month at midnight
@scheduler(name="billing", trigger="cron", day=1, hour=0)
def monthly_billing() -> None:
    process_billing()
