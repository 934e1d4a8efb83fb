from datetime import datetime

from corral import scheduler


def close_campaign() -> None: ...


@scheduler(name="campaign", trigger="date", run_date=datetime(2026, 12, 31, 23, 59))
async def end_campaign() -> None:
    close_campaign()
