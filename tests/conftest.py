from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest

from corral import Pool

START_METHODS = ["forkserver", "spawn"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-jobs",
        type=int,
        default=2000,
        help="jobs in the soak tests (the default keeps them near a minute)",
    )
    parser.addoption(
        "--simulation-steps",
        type=int,
        default=5000,
        help="events per seed in the supervisor's simulation (the default keeps it in seconds)",
    )
    parser.addoption(
        "--simulation-seed",
        type=int,
        default=None,
        help="run the supervisor's simulation with this seed only (to replay a failure)",
    )


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` (the default, see pyproject.toml): two test processes per CPU, at most eight;
    most tests wait on processes, servers and databases rather than compute. The environment
    variable ``PYTEST_XDIST_AUTO_NUM_WORKERS`` sets another number."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # pytest-xdist reads it
    return min(8, 2 * (os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The soak tests get time in proportion to ``--soak-jobs``, the simulation in proportion to
    ``--simulation-steps`` (the default timeout is 180 s)."""
    soak = 180 + config.getoption("--soak-jobs") / 50
    simulation = 180 + config.getoption("--simulation-steps") / 500
    for item in items:
        if item.path.stem == "test_soak":
            item.add_marker(pytest.mark.timeout(soak))
        elif item.path.stem == "test_supervisor_simulation":
            item.add_marker(pytest.mark.timeout(simulation))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Tests marked ``off_main_thread`` run on a thread of their own, as an app's worker thread
    would call the pool: a caller there reads its job's reply itself, which the main thread
    (where signal handlers run) never does."""
    if pyfuncitem.get_closest_marker("off_main_thread") is None:
        return None
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    raised: list[BaseException] = []

    def run() -> None:
        try:
            pyfuncitem.obj(**arguments)
        except BaseException as exc:
            raised.append(exc)

    caller = threading.Thread(target=run, name="test-caller")
    caller.start()
    caller.join()
    if raised:
        raise raised[0]
    return True


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Return ``predicate()``'s first truthy value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate!r}")
        pause.wait(0.01)


def assert_gone(pids: list[int], timeout: float = 5.0) -> None:
    """Every process in ``pids`` has exited and been reaped within ``timeout``."""
    left = still_alive(pids, timeout)
    assert not left, f"processes still alive: {left}"


def still_alive(pids: list[int], timeout: float = 5.0) -> list[tuple[int, str]]:
    """The processes of ``pids`` (pid, status) still there after waiting up to ``timeout`` for
    them to exit and be reaped."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    # wait_procs reaps only our own children; a zombie of another parent still counts as left over
    left: list[tuple[int, str]] = []
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running():
                left.append((process.pid, process.status()))
    return left


def busy_pids(pool: Pool) -> list[int]:
    return [w.pid for w in pool.statistics().workers if w.state == "busy"]


def worker_pids(pool: Pool) -> list[int]:
    return [w.pid for w in pool.statistics().workers]


PoolFactory = Callable[..., Pool]


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_pool(start_method: str) -> Iterator[PoolFactory]:
    """Make started pools with test-friendly defaults; shut them down and check for leftovers."""
    pools: list[Pool] = []
    seen: set[int] = set()

    def make(**options: Any) -> Pool:
        options.setdefault("workers", 2)
        options.setdefault("kill_grace", 0.5)
        options.setdefault("start_method", start_method)
        pool = Pool(**options)
        pool.start()
        assert pool.wait_ready(30), "workers did not start"
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        seen.update(worker_pids(pool))
        pool.shutdown(wait=True, timeout=5)
        seen.update(worker_pids(pool))
    assert_gone(sorted(seen))


@pytest.fixture
def pool(make_pool: PoolFactory) -> Pool:
    return make_pool()


@pytest.fixture(autouse=True)
def empty_task_registry() -> Iterator[None]:
    """Each test starts with no declared task; modules imported at collection do declare some."""
    from corral._decorator import _registry

    saved = dict(_registry)
    _registry.clear()
    yield
    _registry.clear()
    _registry.update(saved)


@pytest.fixture
def load() -> Iterator[Callable[[str], ModuleType]]:
    """Import an example module afresh (its tasks are forgotten after the test)."""
    loaded: list[str] = []

    def load(name: str) -> ModuleType:
        sys.modules.pop(name, None)
        loaded.append(name)
        return importlib.import_module(name)

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


# -- databases for the ledger ---------------------------------------------------------------------

POSTGRES_ENV = "CORRAL_TEST_POSTGRES"
DATABASES = ["sqlite", "postgresql"]


def fresh_database(kind: str, folder: Path) -> str:
    """A URL of an empty ledger database: a new SQLite file, or the test PostgreSQL server with
    corral's tables dropped. PostgreSQL tests skip unless ``CORRAL_TEST_POSTGRES`` is set."""
    if kind == "sqlite":
        return f"sqlite:///{folder / 'corral.db'}"
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(
            f"no PostgreSQL server: set {POSTGRES_ENV}=postgresql://user@host:port/db "
            f"(.ci/postgres starts one and prints its URL)"
        )
    from sqlalchemy import create_engine, make_url, text

    test_process = os.environ.get("PYTEST_XDIST_WORKER")
    if test_process:  # tests run in several processes at once: a database for each
        server = make_url(url)
        name = f"{server.database}_{test_process}"
        admin = create_engine(
            server.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
        )
        try:
            with admin.connect() as connection:
                exists = connection.execute(
                    text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
                ).first()
                if exists is None:
                    connection.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        url = server.set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE IF EXISTS corral_runs, corral_replicas"))
    finally:
        engine.dispose()
    return url


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database(str(request.param), tmp_path)
