"""Bad input: each row of docs/errors.md is produced here, and its message is the real one."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import jobs
from corral import Pool, ProcessExecutor, QueueFullError, RemoteError, SchedulerConfig, scheduler
from corral._cli import main
from corral._pool._refs import reference_of
from corral.ravyn import AsynczConfig

ROOT = Path(__file__).parent.parent


def documented() -> dict[str, list[str]]:
    """Input cell -> the message fragments (in backticks) of its row."""
    rows = {}
    for line in (ROOT / "docs" / "errors.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("Input", "---"):
            rows[cells[0]] = re.findall(r"`([^`]+)`", cells[2])
    return rows


def raised(action: Callable[[], Any]) -> str:
    with pytest.raises(Exception) as caught:  # noqa: PT011 - each row names its own error
        action()
    return f"{type(caught.value).__name__}: {caught.value}"


def local_function() -> Any:
    def inner() -> None:
        pass

    return inner


class Holder:
    def method(self) -> None:
        pass


@pytest.fixture(scope="module")
def pool() -> Any:
    with Pool(workers=1, queue_size=1, max_result_size="1MiB") as pool:
        yield pool


def outcome(future: Any) -> str:
    error = future.exception(timeout=30)
    return f"{type(error).__name__}: {error}"


def full_queue(pool: Pool) -> str:
    gate = pool.submit(jobs.sleep, 0.5)
    for _ in range(50):
        try:
            pool.submit(jobs.noop)
        except QueueFullError as exc:
            gate.result(10)
            return str(exc)
    raise AssertionError("the queue never filled")


CASES: dict[str, Callable[[Any], str]] = {
    "`SchedulerConfig(workers=0)`": lambda _: raised(lambda: SchedulerConfig(workers=0)),
    "`SchedulerConfig(timeout=-1)`": lambda _: raised(lambda: SchedulerConfig(timeout=-1)),
    "`SchedulerConfig(enabeld=True)`": lambda _: raised(lambda: SchedulerConfig(enabeld=True)),  # type: ignore[call-arg]
    '`SchedulerConfig(executor="gpu")`': lambda _: raised(lambda: SchedulerConfig(executor="gpu")),  # type: ignore[arg-type]
    '`SchedulerConfig(timezone="Mars/Base")`': lambda _: raised(
        lambda: SchedulerConfig(timezone="Mars/Base")
    ),
    '`SchedulerConfig(max_memory="lots")`': lambda _: raised(
        lambda: SchedulerConfig(max_memory="lots")
    ),
    '`@scheduler(trigger="weekly")`': lambda _: raised(lambda: scheduler(trigger="weekly")),  # type: ignore[arg-type]
    '`@scheduler(trigger="interval", hour=1)`': lambda _: raised(
        lambda: scheduler(trigger="interval", hour=1)
    ),
    '`@scheduler(trigger="interval")`': lambda _: raised(lambda: scheduler(trigger="interval")),
    '`@scheduler(trigger="cron", hour=25)`': lambda _: raised(
        lambda: scheduler(trigger="cron", hour=25)
    ),
    '`@scheduler(trigger="cron", day_of_week="funday")`': lambda _: raised(
        lambda: scheduler(trigger="cron", day_of_week="funday")
    ),
    '`@scheduler(trigger="date", run_time=...)`': lambda _: raised(
        lambda: scheduler(trigger="date", run_time="2030-01-01")
    ),
    "`@scheduler()`": lambda _: raised(lambda: scheduler()),
    '`@scheduler(..., timeout=5, executor="thread")`': lambda _: raised(
        lambda: scheduler(trigger="interval", hours=1, timeout=5, executor="thread")
    ),
    '`@scheduler(..., timezone="Europe/Pariss")`': lambda _: raised(
        lambda: scheduler(trigger="cron", hour=9, timezone="Europe/Pariss")
    ),
    "`ProcessExecutor(max_workers=2, workers=3)`": lambda _: raised(
        lambda: ProcessExecutor(max_workers=2, workers=3)
    ),
    '`ProcessExecutor(task_timeouts={"report": 0})`': lambda _: raised(
        lambda: ProcessExecutor(task_timeouts={"report": 0})
    ),
    '`AsynczConfig(configurations={"asyncz.stores.default": {"type": "redis"}})`': lambda _: raised(
        lambda: AsynczConfig(configurations={"asyncz.stores.default": {"type": "redis"}})
    ),
    "a lambda as a task or job": lambda pool: raised(lambda: pool.submit(lambda: None)),
    "a function defined inside a function": lambda _: raised(
        lambda: scheduler(trigger="interval", hours=1)(local_function())
    ),
    "a method of an instance that no module-level name holds": lambda _: raised(
        lambda: reference_of(Holder().method)
    ),
    "`pool.submit(fn, a_lock)`": lambda pool: raised(
        lambda: pool.submit(jobs.takes, threading.Lock())
    ),
    "a full queue": full_queue,
    "an exception class the app cannot import": lambda pool: outcome(
        pool.submit(jobs.raise_unloadable)
    ),
    "a result that cannot be pickled": lambda pool: outcome(pool.submit(jobs.return_unpicklable)),
    "a result the app cannot unpickle": lambda pool: outcome(pool.submit(jobs.return_unloadable)),
    "a result over `max_result_size`": lambda pool: outcome(pool.submit(jobs.big_result, 2)),
}


def test_every_documented_row_is_tested() -> None:
    assert set(documented()) == set(CASES) | {
        "`CORRAL_WORKERS=many`",
        "`corral run no_such_module`",
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_documented_message_is_the_real_one(case: str, pool: Pool) -> None:
    message = CASES[case](pool)
    for fragment in documented()[case]:
        assert fragment in message, (fragment, message)


def test_environment_values_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_WORKERS", "many")
    message = raised(lambda: SchedulerConfig())
    for fragment in documented()["`CORRAL_WORKERS=many`"]:
        assert fragment in message


def test_command_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "no_such_module"]) == 2
    err = capsys.readouterr().err
    for fragment in documented()["`corral run no_such_module`"]:
        assert fragment in err


def test_the_pool_survives_every_bad_job(pool: Pool) -> None:
    assert isinstance(pool.submit(jobs.raise_unloadable).exception(30), RemoteError)
    assert pool.submit(jobs.add, 2, 2).result(30) == 4
