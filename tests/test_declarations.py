"""Declarations that used to fail obscurely: a module imported twice, a misspelt per-task time
zone, and ``corral check`` reading the time zone of the app's own config."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from corral import ConfigurationError, scheduler
from corral._cli import main
from corral._decorator import TriggerName, unregister

ROOT = Path(__file__).parent.parent


def test_a_script_imported_again_under_its_own_name_keeps_one_task(tmp_path: Path) -> None:
    script = tmp_path / "service.py"
    script.write_text(
        textwrap.dedent(
            """
            from corral import registered_tasks, scheduler

            @scheduler(name="sync", trigger="interval", hours=1)
            def sync() -> None:
                pass

            if __name__ == "__main__":
                import service  # what uvicorn.run("service:app") does from this script
                print([f"{spec.fn.__module__}:{spec.id}" for spec in registered_tasks()])
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['service:sync']"]
    assert "already used" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "Task 'sync' is declared twice, as __main__:sync and service:sync" in message
    assert f"{script} was imported twice, as the script (__main__) and as 'service'" in message
    assert "corral schedules service:sync" in message
    assert "start the server with the module's name (uvicorn service:app)" in message


def test_two_different_functions_under_one_id_are_still_refused() -> None:
    import tasks

    scheduler(name="t-twice", trigger="interval", hours=1)(tasks.where)
    try:
        with pytest.raises(ConfigurationError, match="already used by tasks:where"):
            scheduler(name="t-twice", trigger="interval", hours=1)(tasks.block)
    finally:
        unregister("t-twice")


@pytest.mark.parametrize("trigger", ["cron", "interval", "date"])
def test_a_misspelt_per_task_time_zone_is_refused_at_declaration_with_the_task_name(
    trigger: TriggerName,
) -> None:
    import tasks

    args: dict[str, dict[str, Any]] = {
        "cron": {"hour": 9},
        "interval": {"hours": 1},
        "date": {"run_date": "2030-01-01"},
    }
    with pytest.raises(ConfigurationError) as caught:
        scheduler(
            name="nine",
            trigger=trigger,
            timezone="Europe/Pariss",
            **args[trigger],
        )(tasks.where)
    assert str(caught.value) == (
        "task 'nine': unknown time zone 'Europe/Pariss'; did you mean 'Europe/Paris'? use an "
        "IANA name such as 'UTC' or 'Europe/Paris'"
    )
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_corral_check_uses_the_time_zone_of_the_apps_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "ny_app.py"
    module.write_text(
        textwrap.dedent(
            """
            from ravyn import Ravyn

            from corral import scheduler
            from corral.ravyn import SchedulerConfig, SchedulerSettings


            class AppSettings(SchedulerSettings):
                scheduler_config: SchedulerConfig = SchedulerConfig(
                    enabled=True, timezone="America/New_York"
                )


            app = Ravyn(settings_module=AppSettings)


            @scheduler(name="ny-nine", trigger="cron", hour=9, minute=0)
            def nine() -> None:
                pass
            """
        )
    )
    try:
        assert main(["check", str(module)]) == 0
    finally:
        sys.modules.pop("ny_app", None)
    out = capsys.readouterr().out
    assert len(re.findall(r"T09:00:00-0[45]:00", out)) == 5, out  # 09:00 in New York
