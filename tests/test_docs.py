"""Every example in docs/ and the README runs, and does what its text says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run_example(name: str, timeout: float = 60) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_isolation_example_shows_each_fault_costing_only_its_job() -> None:
    out = run_example("isolation.py")
    app_pid, job_pid = map(int, re.findall(r"app process (\d+), job process (\d+)", out)[0])
    assert app_pid != job_pid
    assert "fib(27) = 196418" in out
    assert re.search(r"crash: worker \d+ died while running job \d+ .*SIGSEGV", out)
    assert "hang: job 4 (__main__:hang) ran past its timeout of 0.5s" in out
    assert "fib(20) = 6765" in out
    assert "completed=3 crashed=1 timed_out=1 restarts=2" in out


def test_readme_quick_start_commands_are_the_ones_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert commands[0] == "python -m pip install . && corral run corral.demo --duration 30"
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_python_examples_run(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.+?)```", readme, flags=re.S)
    assert blocks
    for number, block in enumerate(blocks):
        script = tmp_path / f"readme_{number}.py"
        script.write_text(block)
        result = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        for expected in re.findall(r"# (\S+)$", block, flags=re.M):
            if expected.isdigit():
                assert expected in result.stdout


def test_docs_code_blocks_are_tested_example_files() -> None:
    """Code in docs/*.md and the README's scheduler section is included from tested files."""
    for page in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]:
        for block in re.findall(r"```python\n(.+?)```", page.read_text(), flags=re.S):
            if page.name == "README.md":
                continue  # the README's blocks run in test_readme_python_examples_run
            include = re.fullmatch(r'--8<-- "(.+?)"\n', block)
            assert include, f"{page.name}: inline code block; move it to docs/examples/"
            assert (ROOT / include.group(1)).is_file(), include.group(1)
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_docs*.py"))
    for example in (ROOT / "docs" / "examples").glob("*.py"):
        assert example.stem in tests or example.name in tests, f"no test runs {example.name}"


def test_readme_shows_the_scheduler_example_verbatim() -> None:
    example = (ROOT / "docs" / "examples" / "readme_scheduler.py").read_text()
    assert f"```python\n{example}```" in (ROOT / "README.md").read_text()


def test_readme_scheduler_example_runs_tasks_in_workers() -> None:
    out = run_example("readme_scheduler.py")
    app_pid = int(re.findall(r"app process (\d+)", out)[0])
    workers = {int(pid) for pid in re.findall(r"built in process (\d+)", out)}
    assert len(re.findall(r"report \d+ built", out)) == 3
    assert workers and app_pid not in workers
