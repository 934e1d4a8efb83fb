"""``corral run module:attr``: the object ``attr`` names in the module, and the config and tasks
it gives.

``attr`` (a dotted path: ``app:state.scheduler`` works too) may name a ``Scheduler`` (its config
and the tasks it would run), a ``SchedulerConfig`` (the module's ``@scheduler`` tasks, run with
it), or an object holding a ``SchedulerConfig`` as ``scheduler_config`` or ``config`` (a Ravyn
app or settings).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from corral._config import SchedulerConfig
from corral._decorator import TaskSpec
from corral._runtime import Scheduler


class TargetError(Exception):
    """The object a ``module:attr`` target names is missing or of no use."""


def split(target: str) -> tuple[str, str | None]:
    """``module:attr`` as ``(module, attr)``; any other target as ``(target, None)``."""
    head, colon, tail = target.rpartition(":")
    if colon and head and all(part.isidentifier() for part in tail.split(".")):
        return head, tail
    return target, None


def attribute(module: ModuleType, path: str, target: str) -> Any:
    value: Any = module
    for name in path.split("."):
        try:
            value = getattr(value, name)
        except AttributeError:
            raise TargetError(f"{target}: {module.__name__!r} has no attribute {path!r}") from None
    return value


def config_of(value: Any, target: str) -> SchedulerConfig:
    """The config of what ``module:attr`` names."""
    if isinstance(value, Scheduler):
        return value.config
    if isinstance(value, SchedulerConfig):
        return value
    for name in ("scheduler_config", "config"):
        try:
            held = getattr(value, name, None)
        except Exception:  # a property that cannot be read here holds no config
            held = None
        if isinstance(held, SchedulerConfig):
            return held
    raise TargetError(
        f"{target} is of type {type(value).__name__}, not a Scheduler, a SchedulerConfig or an "
        "object holding one as scheduler_config"
    )


def scheduler_tasks(value: Any) -> list[TaskSpec] | None:
    """The tasks a ``Scheduler`` would run (``None`` for anything else): those it was given, or
    every ``@scheduler`` task declared once its config's ``modules`` are imported, and those
    added with ``add_task``."""
    if not isinstance(value, Scheduler):
        return None
    for module in value.config.modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise TargetError(f"modules: cannot import {module!r}: {exc}") from None
    return value._specs()
