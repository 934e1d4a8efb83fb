"""What ``corral run`` writes: one line format (or JSON) for its own events, the tasks' logs and
prints, each with its time, level, logger and task; the live view; ``module:attr`` targets."""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asyncz.events.constants import TASK_ERROR, TASK_EXECUTED
from rich.console import Console

import cli_log_tasks
from corral import Scheduler
from corral._cli import main
from corral._cli_logging import configured
from corral._monitor import Monitor, size
from schedtools import Recorder
from test_cli import corral_run

LINE = re.compile(
    r"time=(?P<time>\S+) level=(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"logger=(?P<logger>\S+) event=(?P<event>log|output|outcome|note|status) "
    r"task=(?P<task>\S+)( pid=\d+)? \w+="
)


@pytest.fixture(autouse=True)
def fresh_task_modules() -> Iterator[None]:
    yield
    for name in ("cli_tasks", "attr_app"):
        sys.modules.pop(name, None)


def run_until(args: list[str], *patterns: str) -> list[str]:
    """``corral run cli_log_tasks ARGS --plain`` until each pattern was seen; then SIGTERM, exit
    status 0, and every line it wrote."""
    with corral_run("cli_log_tasks", *args) as (process, output):
        for pattern in patterns:
            output.wait_for(pattern, timeout=60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        return output.until_end()


def test_plain_lines_share_one_format_and_name_the_task_of_each_log_and_print() -> None:
    lines = run_until(
        [],
        r"event=outcome task=fails kind=failed",
        r"event=outcome task=talks kind=executed",
        r"event=outcome task=in-thread kind=executed",
        r"event=outcome task=on-loop kind=executed",
    )
    top = [line.rstrip("\n") for line in lines if not line.startswith("  ")]
    for line in top:
        match = LINE.match(line)
        assert match, line
        assert datetime.fromisoformat(match["time"]).utcoffset() is not None  # zone in the time
        assert not re.search(r"=['\"]", line), f"a quoted value: {line}"
    text = "\n".join(top)
    # The tasks' own log records and prints, in a worker and in a thread of this process.
    pid = re.search(r"level=WARNING logger=cli_log_tasks event=log task=talks pid=(\d+) ", text)
    assert pid and f"msg=careful in {pid[1]}" in text
    for expected in (
        rf"level=INFO logger=cli_log_tasks event=log task=talks pid={pid[1]} msg=hello from",
        rf"level=INFO logger=corral.stdout event=output task=talks pid={pid[1]} msg=printed on "
        "stdout",
        rf"level=WARNING logger=corral.stderr event=output task=talks pid={pid[1]} msg=printed "
        "on stderr",
        r"level=INFO logger=cli_log_tasks event=log task=in-thread msg=logged in a thread",
        r"level=INFO logger=corral.stdout event=output task=in-thread msg=printed in a thread",
        r"level=INFO logger=cli_log_tasks event=log task=on-loop msg=logged on the event loop",
        r"level=INFO logger=corral.run event=note task=- msg=SIGTERM: finishing running tasks",
        r"event=status task=- .*missed=0 cancelled=0 .*start_failures=0",
    ):
        assert re.search(expected, text), expected
    # Each failure once: its outcome line, in full, with the worker's traceback below it.
    failures = [line for line in top if "broken beyond repair" in line]
    assert failures
    detail = f"detail=ValueError: broken beyond repair {cli_log_tasks.LONG} end-of-detail"
    assert all(
        line.startswith("time=")
        and "level=ERROR logger=corral.run event=outcome task=fails kind=failed " + detail in line
        for line in failures
    ), failures
    first = lines.index(next(line for line in lines if "kind=failed" in line))
    assert lines[first + 1] == "  Traceback (most recent call last):\n"
    assert "raise ValueError" in "".join(lines[first + 1 : first + 8])


def test_json_lines_are_one_object_each_for_log_shippers() -> None:
    lines = run_until(
        ["--log-format", "json"],
        r'"task": "fails", .*"kind": "failed"',
        r'"task": "talks", .*"msg": "printed on stdout"',
    )
    records = [json.loads(line) for line in lines]
    for record in records:
        assert {"time", "level", "logger", "event", "task", "msg"} <= set(record), record
        assert datetime.fromisoformat(record["time"]).utcoffset() is not None
    failed = next(r for r in records if r.get("kind") == "failed")
    assert failed["level"] == "ERROR" and failed["task"] == "fails"
    assert failed["detail"].endswith("end-of-detail")
    assert "raise ValueError" in failed["traceback"]
    printed = next(r for r in records if r["msg"] == "printed on stdout")
    assert printed["event"] == "output" and printed["task"] == "talks"
    assert isinstance(printed["pid"], int)
    status = next(r for r in records if r["event"] == "status")
    assert isinstance(status["completed"], int) and status["completed"] >= 1
    assert isinstance(status["loop_lag_ms"], float)
    assert status["task"] is None


def test_log_level_hides_lower_levels_in_the_app_and_in_workers() -> None:
    lines = run_until(
        ["--log-level", "warning"],
        r"level=WARNING logger=cli_log_tasks event=log task=talks pid=\d+ msg=careful",
        r"kind=failed",
    )
    text = "".join(lines)
    assert "level=INFO" not in text
    assert "hello from the worker" not in text  # the worker logs at the app's level too


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-format", "xml"],
        ["--log-level", "loud"],
        ["--metrics-port", "70000"],
        ["--metrics-port", "-1"],
    ],
)
def test_bad_values_of_the_new_options_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", "cli_tasks", *argv])
    assert exit_.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_live_view_shows_each_failure_once_in_full_with_zoned_times_and_counters() -> None:
    specs = [fn.__corral_task__ for fn in (cli_log_tasks.talks, cli_log_tasks.fails)]  # type: ignore[union-attr]

    async def scenario() -> tuple[str, str]:
        console = Console(record=True, width=300, file=io.StringIO())
        config = cli_log_tasks.scheduler_config.model_copy(update={"enabled": True})
        scheduler = Scheduler(config, tasks=specs)
        monitor = Monitor(scheduler, live=True, console=console)
        with configured(level="INFO", fmt="text", zone=UTC, console=console, stdout=io.StringIO()):
            async with scheduler:
                recorder = Recorder().attach(scheduler)
                assert scheduler.asyncz is not None
                scheduler.asyncz.add_listener(monitor.on_event)
                await recorder.count(TASK_ERROR, "fails", 1, timeout=60)
                await recorder.count(TASK_EXECUTED, "talks", 1, timeout=60)
                logged = console.export_text()
                console.print(monitor.render())
                view = console.export_text()
        return logged, view

    logged, view = asyncio.run(scenario())
    assert "task=talks" in logged and "msg=printed on stdout" in logged
    assert "broken beyond repair" not in logged and "Traceback" not in logged  # only in the view
    assert f"{cli_log_tasks.LONG} end-of-detail" in view  # 200 characters: not cut at 90
    assert re.search(r"\d\d:\d\d:\d\d UTC\s*│\s*fails\s*│\s*failed", view)
    for counter in ("missed 0", "cancelled 0", "start failures 0"):
        assert counter in view
    assert re.search(r"│ \d+ MiB", view)


def test_memory_reads_in_mib_then_gib() -> None:
    assert size(300 * 2**20) == "300 MiB"
    assert size(3 * 2**30 // 2) == "1.50 GiB"


ATTR_APP = """
from corral import Scheduler, SchedulerConfig, scheduler

@scheduler(name="declared", trigger="cron", hour=2, minute=30)
def declared() -> None:
    pass

def added() -> None:
    pass

tokyo = SchedulerConfig(timezone="Asia/Tokyo")
only_added = Scheduler(SchedulerConfig(timezone="Europe/Paris"), tasks=[])
only_added.add_task(added, trigger="cron", hour=3, minute=15, name="added")

class App:
    scheduler_config = SchedulerConfig(timezone="America/New_York")

app = App()
number = 42
"""


@pytest.fixture
def attr_app(tmp_path: Path) -> str:
    path = tmp_path / "attr_app.py"
    path.write_text(ATTR_APP)
    return str(path)


@pytest.mark.parametrize(
    ("attr", "task", "offset"),
    [
        ("tokyo", "declared", "T02:30:00+09:00"),
        ("only_added", "added", "T03:15:00+0"),  # Paris: +01:00 or +02:00
        ("app", "declared", "T02:30:00-0"),  # New York: -05:00 or -04:00
    ],
)
def test_a_module_attr_target_takes_its_config_and_tasks(
    attr_app: str, attr: str, task: str, offset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", f"{attr_app}:{attr}"]) == 0
    out = capsys.readouterr().out
    assert f"ok   {task} " in out and "1 of 1 task(s) ok" in out
    assert offset in out


def test_corral_run_module_attr_runs_a_scheduler_s_tasks(
    attr_app: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", f"{attr_app}:only_added", "--plain", "--duration", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "msg=corral scheduler started: 1 task(s)" in out


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("missing", "'attr_app' has no attribute 'missing'"),
        ("number", ":number is of type int, not a Scheduler, a SchedulerConfig or an object"),
    ],
)
def test_a_module_attr_target_that_gives_no_config_is_one_line_and_exit_2(
    attr_app: str, attr: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", f"{attr_app}:{attr}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
