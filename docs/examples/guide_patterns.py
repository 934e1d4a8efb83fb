"""The page's three patterns, with a SQLite database standing in for the app's ORM."""

import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from corral import scheduler

DATABASE = os.environ.get("APP_DATABASE", "app.db")
USERS_FEED = os.environ.get("APP_USERS_FEED", "users.json")
log = logging.getLogger("app.tasks")


@contextmanager
def database() -> Iterator[sqlite3.Connection]:
    """A connection that commits what the block did and is closed after it (a connection's own
    ``with`` commits but does not close)."""
    connection = sqlite3.connect(DATABASE)
    try:
        with connection:
            yield connection
    finally:
        connection.close()


# Pattern 1: Database cleanup. Sync and blocking: it runs in a worker process, so the app's
# event loop never waits for it.
@scheduler(name="cleanup", trigger="cron", hour=2, minute=0)
def cleanup_old_sessions() -> int:
    """Delete old sessions every day at 2 AM."""
    cutoff = datetime.now(UTC) - timedelta(days=30)
    with database() as db:
        deleted = db.execute("DELETE FROM sessions WHERE created_at < ?", (cutoff.isoformat(),))
    print(f"Cleaned up sessions older than {cutoff:%Y-%m-%d}")
    return deleted.rowcount


# Pattern 2: API sync (the "API" is a JSON document here).
@scheduler(name="sync_users", trigger="interval", minutes=15)
def sync_users_from_api() -> int:
    """Sync users every 15 minutes."""
    users = json.loads(Path(USERS_FEED).read_text())
    with database() as db:
        db.executemany(
            "INSERT INTO users (id, name) VALUES (:id, :name) "
            "ON CONFLICT(id) DO UPDATE SET name = excluded.name",
            users,
        )
    return len(users)


# Pattern 3: Report generation.
@scheduler(name="daily_report", trigger="cron", hour=8, minute=0)
def send_daily_report() -> dict[str, int]:
    """Send daily report at 8 AM."""
    with database() as db:
        (users,) = db.execute("SELECT COUNT(*) FROM users").fetchone()
        (sessions,) = db.execute("SELECT COUNT(*) FROM sessions").fetchone()
    stats = {"users": users, "sessions": sessions}
    log.info("Daily report for admin@example.com: %s", stats)  # your mail client here
    return stats
