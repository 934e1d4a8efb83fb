"""The public surface: exactly what ``__all__`` says, and light where workers import it."""

from __future__ import annotations

import inspect
import subprocess
import sys

import corral
from corral import _exceptions


def test_every_public_name_resolves_and_nothing_public_is_missing() -> None:
    assert len(set(corral.__all__)) == len(corral.__all__)
    for name in corral.__all__:
        assert getattr(corral, name) is not None, name
    exceptions = {
        name
        for name, value in vars(_exceptions).items()
        if inspect.isclass(value) and issubclass(value, BaseException) and not name.startswith("_")
    }
    assert exceptions <= set(corral.__all__)
    assert sorted(dir(corral)) == sorted(corral.__all__)


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    assert corral.__version__ == version("corral")


def test_a_worker_imports_neither_the_scheduler_nor_pydantic() -> None:
    code = (
        "import sys, corral._pool._worker\n"
        "heavy = ('asyncz', 'pydantic', 'psutil', 'ravyn', 'anyio')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"


def test_a_worker_importing_a_task_module_stays_light() -> None:
    import jobs
    from corral import Pool

    with Pool(workers=1) as pool:
        assert pool.submit(jobs.import_and_list_heavy, "app_tasks").result(60) == []
        assert pool.submit(jobs.imported, "app_tasks").result(60) is True
