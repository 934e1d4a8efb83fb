"""The ledger's tables and engines: one SQLAlchemy Core schema for SQLite and PostgreSQL.

``corral_runs`` has one row per run: a fire (task, scheduled time) and its attempt are its
unique key, so a claim is one ``INSERT ... ON CONFLICT DO NOTHING`` that exactly one replica
wins. ``corral_replicas`` has one row per live replica and its lease.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from corral._exceptions import ConfigurationError

metadata = MetaData()

runs = Table(
    "corral_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task", String(200), nullable=False),
    Column("scheduled_us", BigInteger, nullable=False),
    Column("attempt", Integer, nullable=False, default=0),
    Column("batch", String(40), nullable=False),
    Column("status", String(16), nullable=False),
    Column("replica", String(40), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("claimed_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("worker_pid", Integer),
    Column("duration", Float),
    Column("error", Text),
    UniqueConstraint("task", "scheduled_us", "attempt", name="corral_runs_fire"),
    Index("corral_runs_open", "status", "task"),
    Index("corral_runs_replica", "replica", "status"),
    Index("corral_runs_finished", "finished_at"),
)

replicas = Table(
    "corral_replicas",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("renewed_at", Float, nullable=False),
    Column("lease_until", Float, nullable=False),
)

SQLITE_BUSY_MS = 10_000
CONNECT_TIMEOUT = 5


def check_url(url: str) -> str:
    """``url`` if corral can use it; a ``ConfigurationError`` that says why not otherwise."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        parsed = None
    backend = parsed.get_backend_name() if parsed is not None else ""
    if parsed is None or backend not in ("sqlite", "postgresql"):
        raise ConfigurationError(
            f"database={url!r} is not a database URL corral can use; expected "
            f"'sqlite:///path/to/corral.db' (one host) or "
            f"'postgresql://user:password@host/dbname' (several hosts)"
        )
    if backend == "sqlite":
        path = parsed.database or ""
        if path in ("", ":memory:") or path.startswith("file::memory:"):
            raise ConfigurationError(
                f"database={url!r} is an in-memory SQLite database, which other processes "
                f"cannot share; give a file: 'sqlite:///path/to/corral.db'"
            )
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ConfigurationError(
                f"database={url!r}: the folder {folder!r} does not exist; create it or "
                f"choose a file in an existing folder"
            )
    return url


def safe_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _to_wal(cursor: Any) -> None:
    """Put the database in WAL mode. SQLite answers "database is locked" at once, without
    waiting ``busy_timeout``, while another process switches a new file's mode: try again for
    as long as that timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_MS / 1000
    pause = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)  # (not the event loop: engines are used on the ledger's thread)
        pause = min(pause * 2, 0.1)


def make_engine(url: str) -> Engine:
    """An engine for ``url``: SQLite in WAL mode with writes serialised by ``BEGIN IMMEDIATE``;
    PostgreSQL through psycopg 3 with a connect timeout and pre-ping (it reconnects by itself)."""
    parsed = make_url(check_url(url))
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            parsed.set(drivername="sqlite+pysqlite"),
            connect_args={"timeout": SQLITE_BUSY_MS / 1000, "check_same_thread": False},
        )

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, record: Any) -> None:
            # Transactions are begun by the "begin" hook below, not by the driver.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
                _to_wal(cursor)
                cursor.execute("PRAGMA synchronous=NORMAL")
            finally:
                cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Connection) -> None:
            # Take the write lock at the start: a claim's count and insert see one state.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        return create_engine(
            parsed,
            pool_pre_ping=True,
            pool_size=2,
            max_overflow=2,
            connect_args={
                "connect_timeout": CONNECT_TIMEOUT,
                # A server that stops answering (packets dropped) fails the call it holds up
                # within seconds, as one that refuses does, instead of in the kernel's minutes.
                "tcp_user_timeout": CONNECT_TIMEOUT * 1000,
                "keepalives": 1,
                "keepalives_idle": CONNECT_TIMEOUT,
                "keepalives_interval": 1,
                "keepalives_count": CONNECT_TIMEOUT,
            },
        )
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"database={safe_url(url)!r} needs the PostgreSQL driver psycopg 3 ({exc}); "
            f"install it with: pip install 'corral[postgresql]'"
        ) from None


@contextlib.contextmanager
def transaction(engine: Engine, lock: str | Iterable[str] | None = None) -> Iterator[Connection]:
    """A write transaction; with ``lock`` (a name or several), serialised with every other
    holder of those names.

    SQLite serialises every write transaction (``BEGIN IMMEDIATE``); PostgreSQL takes a
    transaction-scoped advisory lock on each name's hash, in one order, so that two
    transactions taking several never deadlock.
    """
    names = [] if lock is None else [lock] if isinstance(lock, str) else sorted(set(lock))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            for name in names:
                connection.execute(_ADVISORY_LOCK, {"name": name})
        yield connection


_ADVISORY_LOCK = select(func.pg_advisory_xact_lock(func.hashtext(bindparam("name"))))


def create_tables(engine: Engine) -> None:
    """Create the tables if they are missing (replicas starting together create them once)."""
    with transaction(engine, lock="corral:schema") as connection:
        metadata.create_all(connection, checkfirst=True)


def insert_ignoring_conflicts(
    connection: Connection, table: Table, values: dict[str, Any]
) -> int | None:
    """Insert one row unless it conflicts with the table's unique key: the new row's id, or
    ``None`` if another row holds the key."""
    row = connection.execute(_insert_statement(connection.dialect.name, table), values).first()
    return None if row is None else int(row[0])


@functools.cache
def _insert_statement(dialect: str, table: Table) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    return insert(table).on_conflict_do_nothing().returning(table.c.id)
