"""Warnings for set-ups that would otherwise do nothing, silently: each says what to change."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral._config import SchedulerConfig
    from corral._decorator import TaskSpec

logger = logging.getLogger("corral.scheduler")

_RAVYN_TASKS = "ravyn.contrib.schedulers.asyncz.config"  # where Ravyn's Task class lives


def warn_disabled(config: SchedulerConfig) -> None:
    """The scheduler was asked to start with ``enabled=False``."""
    source = " (from CORRAL_ENABLED)" if "CORRAL_ENABLED" in os.environ else ""
    logger.warning(
        "corral scheduler is disabled (enabled=False%s): no task will run and no worker starts. "
        "To run the tasks: SchedulerConfig(enabled=True, ...) or CORRAL_ENABLED=true",
        source,
    )


def warn_about_tasks(specs: Iterable[TaskSpec]) -> None:
    """No task to run, or tasks declared with Ravyn's ``@scheduler`` that nothing will run."""
    specs = list(specs)
    ignored = [name for name in ravyn_tasks() if name not in {_reference(s.fn) for s in specs}]
    if ignored:
        logger.warning(
            "%d task(s) declared with Ravyn's @scheduler are not scheduled: %s. corral reads "
            "them from corral.ravyn.AsynczConfig(tasks={'<name>': '<module>'}) (Ravyn's own "
            "form, e.g. tasks={%r: %r}), or declare them with corral's @scheduler",
            len(ignored),
            ", ".join(ignored),
            *reversed(ignored[0].split(":")),
        )
    if not specs:
        logger.warning(
            "corral scheduler started with no task: nothing will run. Declare tasks with "
            "corral's @scheduler in a module imported before start (or listed in "
            "SchedulerConfig(modules=[...])), or add them with Scheduler.add_task()"
        )


def ravyn_tasks() -> list[str]:
    """``"module:name"`` of every enabled Ravyn ``@scheduler`` task a loaded module holds."""
    task_class: Any = getattr(sys.modules.get(_RAVYN_TASKS), "Task", None)
    if task_class is None:
        return []
    found = []
    for module_name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if module_name == "__main__" or not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if (
                isinstance(value, task_class)
                and value.is_enabled
                and getattr(value.fn, "__module__", "") == module_name
            ):
                found.append(f"{module_name}:{name}")
    return found


def _reference(fn: Any) -> str:
    """``"module:name"`` of a Ravyn task's function (its wrapper keeps the original's names)."""
    return f"{getattr(fn, '__module__', '')}:{getattr(fn, '__qualname__', '')}"
