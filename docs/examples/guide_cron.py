import asyncio

from corral import scheduler


async def create_report() -> str:
    await asyncio.sleep(0)  # gather the day's numbers
    return "42 orders"


async def send_email(body: str) -> None:
    await asyncio.sleep(0)  # your mail client
    print(f"sent: {body}")


@scheduler(name="daily_report", trigger="cron", hour=9, minute=0)
async def generate_daily_report() -> None:
    """Run every day at 9:00 AM."""
    report = await create_report()
    await send_email(report)
