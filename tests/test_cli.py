"""The ``corral`` command, in process and as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral._cli import main

ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def fresh_task_modules() -> Iterator[None]:
    yield
    for name in ("cli_tasks", "cli_stuck"):
        sys.modules.pop(name, None)


def test_check_validates_tasks_and_prints_next_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "cli_tasks"]) == 0
    out = capsys.readouterr().out
    assert "ok   cli-tick (cli_tasks:tick), next runs:" in out
    nightly = out.split("cli-nightly")[1]
    assert len(re.findall(r"T02:30:00", nightly)) == 5
    assert "cli-stuck" not in out  # is_enabled=False
    assert "2 of 2 task(s) ok" in out


def test_check_fails_on_a_task_a_worker_cannot_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "shadowed_tasks.py"
    module.write_text(
        "from corral import scheduler\n"
        "def real():\n    pass\n"
        "@scheduler(name='renamed', trigger='interval', hours=1)\n"
        "def task():\n    pass\n"
        "task = real  # the name no longer leads to the task's function\n"
    )
    assert main(["check", str(module)]) == 1
    out = capsys.readouterr().out
    assert "FAIL renamed:" in out and "is not what shadowed_tasks:task names" in out
    assert "0 of 1 task(s) ok" in out


def test_run_in_process_prints_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "cli_tasks", "--duration", "1.5", "--plain"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"event=outcome task=cli-tick kind=executed detail=\d+", out)
    assert "event=note task=- msg=--duration 1.5s reached: finishing running tasks\n" in out
    assert re.search(r"event=status .*workers=0 .*completed=[1-9]", out)


def test_run_options_override_the_module_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "cli_tasks", "--duration", "1", "--plain", "--executor", "thread"]) == 0
    out = capsys.readouterr().out
    tick = re.search(r"task=cli-tick kind=executed detail=(\d+)", out)
    assert tick and int(tick.group(1)) == os.getpid()  # a thread of this process


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "no_such_module"], "corral: cannot import 'no_such_module': no module named"),
        (["check", "missing/file.py"], "corral: no such file: 'missing/file.py'"),
        (["check", "json"], "corral: no @scheduler tasks found in 'json'"),
        (["run", "cli_tasks", "--timezone", "Mars/Base"], "corral: invalid settings: timezone"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_option_values_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", "cli_tasks", "--workers", "0"])
    assert exit_.value.code == 2
    assert "'0' is not a whole number >= 1" in capsys.readouterr().err


class Output:
    """A subprocess's stdout, read on a thread, waited on line by line with a deadline."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert process.stdout is not None
        stream = process.stdout

        def read() -> None:
            for line in stream:
                self.lines.put(line)

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def wait_for(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s: {self.seen}")

    def until_end(self, timeout: float = 60) -> list[str]:
        """Every line, once the process closed its output (it exited)."""
        self.reader.join(timeout)
        assert not self.reader.is_alive(), f"output still open after {timeout}s"
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.seen


def corral_command() -> list[str]:
    script = shutil.which("corral", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "corral"]


@contextlib.contextmanager
def corral_run(*args: str) -> Iterator[tuple[subprocess.Popen[str], Output]]:
    """``corral run ARGS --plain`` as a real subprocess (tests/ on its path), and its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), *sys.path])}
    process = subprocess.Popen(
        [*corral_command(), "run", *args, "--plain"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        yield process, Output(process)
    finally:
        process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()


def test_corral_run_demo_as_a_subprocess_stops_cleanly_on_sigterm() -> None:
    with corral_run("corral.demo") as (process, output):
        output.wait_for(r"event=outcome task=async kind=executed")
        output.wait_for(r"event=outcome task=crashes kind=crashed detail=WorkerDiedError")
        process.send_signal(signal.SIGTERM)
        output.wait_for(r"event=note task=- msg=SIGTERM: finishing running tasks")
        assert process.wait(timeout=30) == 0
        final = "".join(output.seen) + "".join(list(output.lines.queue))
        assert "event=status" in final


@pytest.mark.parametrize(
    ("first", "second"), [(signal.SIGINT, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)]
)
def test_a_second_signal_stops_running_tasks_now_and_exits_128_plus_its_number(
    first: signal.Signals, second: signal.Signals
) -> None:
    with corral_run("cli_stuck") as (process, output):
        output.wait_for(r"event=output task=cli-forever pid=\d+ msg=started$")
        process.send_signal(first)
        output.wait_for(rf"{first.name}: finishing running tasks")
        process.send_signal(second)
        output.wait_for(rf"{second.name}: stopping running tasks now")
        output.wait_for(r"task=cli-forever kind=cancelled")
        assert process.wait(timeout=30) == 128 + second.value  # 130 after a second Ctrl-C


def test_run_live_view_shows_workers_outcomes_and_next_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "cli_tasks", "--duration", "1.5", "--live"]) == 0
    out = capsys.readouterr().out
    assert "app loop lag" in out
    for title in ("Workers", "Recent outcomes", "Next runs"):
        assert title in out
    assert re.search(r"cli-tick\s*│\s*executed", out)


def test_live_view_while_running_lists_each_worker_and_the_next_runs() -> None:
    from asyncz.events.constants import TASK_EXECUTED
    from rich.console import Console

    import cli_tasks
    from corral import Scheduler
    from corral._monitor import Monitor
    from schedtools import Recorder

    async def scenario() -> str:
        specs = [cli_tasks.tick.__corral_task__, cli_tasks.nightly.__corral_task__]  # type: ignore[attr-defined]
        scheduler = Scheduler(
            cli_tasks.scheduler_config.model_copy(update={"enabled": True}), tasks=specs
        )
        async with scheduler:
            recorder = Recorder().attach(scheduler)
            monitor = Monitor(scheduler, live=False)
            scheduler.asyncz.add_listener(monitor.on_event)  # type: ignore[union-attr]
            await recorder.count(TASK_EXECUTED, "cli-tick", 1)
            console = Console(record=True, width=160, file=io.StringIO())
            console.print(monitor.render())
            stats = scheduler.statistics()
            assert stats is not None
            pids = [str(w.pid) for w in stats.workers]
            text = console.export_text()
            assert all(pid in text for pid in pids)
            return text

    text = asyncio.run(scenario())
    assert re.search(r"cli-tick\s*│\s*executed", text)
    assert re.search(r"cli-nightly\s*│\s*02:30:00", text)


def test_sigint_drains_gracefully_and_exits_0() -> None:
    with corral_run("cli_tasks") as (process, output):
        output.wait_for(r"task=cli-tick kind=executed")
        process.send_signal(signal.SIGINT)
        output.wait_for(r"SIGINT: finishing running tasks")
        assert process.wait(timeout=30) == 0
        assert not any("stopping running tasks now" in line for line in output.seen)
