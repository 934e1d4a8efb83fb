"""Per-worker resources: open them once per worker with an initializer, not once per run."""

import os
import sqlite3

from corral import SchedulerConfig, scheduler

_connection: sqlite3.Connection | None = None


def open_database(path: str) -> None:
    """Runs once in each worker process, before its first task."""
    global _connection
    _connection = sqlite3.connect(path)
    _connection.execute("CREATE TABLE IF NOT EXISTS visits (pid INTEGER)")


@scheduler(name="record-visit", trigger="interval", minutes=1)
def record_visit() -> int:
    assert _connection is not None, "the initializer did not run"
    with _connection:
        _connection.execute("INSERT INTO visits VALUES (?)", (os.getpid(),))
    return os.getpid()


config = SchedulerConfig(
    enabled=True,
    workers=2,
    initializer=open_database,
    initargs=(os.environ.get("APP_DATABASE", "app.db"),),
    max_jobs_per_worker=1000,  # a fresh worker (and connection) every 1000 runs
)
