"""Ravyn integration: corral's config in the shapes Ravyn users write, and warnings for set-ups
that Ravyn would silently leave idle.

- :class:`SchedulerConfig` is corral's config that is also a Ravyn scheduler config, so that
  ``Ravyn(scheduler_config=...)`` type-checks. Besides ``@scheduler`` tasks it runs the tasks
  named in ``tasks={"name": "module"}``, Ravyn's form, declared with Ravyn's own ``@scheduler``.
- :class:`AsynczConfig` takes the arguments of Ravyn's ``AsynczConfig`` (``tasks``,
  ``timezone``, ``configurations``), so that changing the import is the whole migration.
- ``RavynSettings`` defines ``scheduler_config`` as a read-only property that returns ``None``,
  so a settings class that declares ``scheduler_config: SchedulerConfig = ...`` is silently
  ignored, and Ravyn starts a scheduler only when ``enable_scheduler`` is true. Derive from
  :class:`SchedulerSettings` instead of ``RavynSettings`` and both are taken care of.
- Importing this module makes every ``Ravyn`` app check, once built, that a corral config it was
  given will start, and log a WARNING that says what to change when it will not.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from collections.abc import Mapping
from datetime import tzinfo
from typing import TYPE_CHECKING, Any

from asyncz.typing import Undefined
from pydantic import BaseModel, Field, model_validator

try:
    from ravyn import Ravyn, RavynSettings
    from ravyn.contrib.schedulers.asyncz.config import Task as _RavynTask
    from ravyn.contrib.schedulers.base import SchedulerConfig as _RavynSchedulerConfig
except ImportError as exc:
    raise ImportError(
        f"corral.ravyn needs Ravyn ({exc}); install it with: pip install 'corral[ravyn]'",
        name=exc.name,
    ) from exc

from corral._asyncz_names import pool_options
from corral._config import SchedulerConfig as _SchedulerConfig
from corral._constants import DEFAULT, EXECUTOR_KINDS
from corral._decorator import register, task_options
from corral._exceptions import ConfigurationError

__all__ = ["AsynczConfig", "SchedulerConfig", "SchedulerSettings"]

logger = logging.getLogger("corral.ravyn")


if TYPE_CHECKING:  # type checkers keep pydantic's metaclass from BaseModel: every field in __init__
    _ConfigMeta = type
else:

    class _ConfigMeta(type(BaseModel), type(_RavynSchedulerConfig)):
        """Pydantic's metaclass (public as ``type(BaseModel)``) and that of Ravyn's (protocol)
        base class, reconciled."""


# Ravyn's base declares start(**kwargs)/shutdown(**kwargs); Ravyn calls them with no arguments.
class SchedulerConfig(_SchedulerConfig, _RavynSchedulerConfig, metaclass=_ConfigMeta):  # type: ignore[misc]
    """:class:`corral.SchedulerConfig`, typed as the scheduler config Ravyn expects."""

    tasks: dict[str, str] = {}
    """Ravyn's form: ``{"cleanup": "app.tasks"}`` runs ``app.tasks.cleanup``, a task declared
    with Ravyn's ``@scheduler`` (or corral's). Imported when the scheduler starts."""

    async def start(self) -> None:  # type: ignore[override]
        """Start a scheduler with this configuration and its ``tasks`` (nothing happens if
        ``enabled=False``)."""
        from corral._runtime import Scheduler

        if self._scheduler is None and self.enabled:
            scheduler = Scheduler(self)
            for fn, options in task_arguments(self.tasks, self._executor_aliases()):
                scheduler.add_task(fn, **options)
            self._scheduler = scheduler
        await super().start()

    def _executor_aliases(self) -> dict[str, str]:
        """asyncz executor aliases a task may name, and the corral executor each stands for."""
        return {}


class AsynczConfig(SchedulerConfig):
    """Ravyn's ``AsynczConfig``, run by corral: ``from corral.ravyn import AsynczConfig`` in place
    of ``from ravyn.contrib.schedulers.asyncz.config import AsynczConfig``.

    Enabled by default, as Ravyn's is (``Ravyn(enable_scheduler=True)`` decides); the time zone
    defaults to Ravyn's ``settings.timezone``. ``configurations`` takes asyncz's keys that mean
    something for corral: ``asyncz.timezone``, ``asyncz.task_defaults.*`` and
    ``asyncz.executors.<alias>`` (each alias stands for one of corral's executors; the process
    pool's arguments become pool settings). Any other key is refused with the reason.
    """

    enabled: bool = True
    timezone: str = Field(default_factory=lambda: _ravyn_timezone())
    configurations: dict[str, Any] | None = None
    """asyncz's global configuration, ``{"asyncz.task_defaults.coalesce": True, ...}``."""
    scheduler_class: Any = None
    """Ravyn's argument; corral runs its own asyncio scheduler (asyncz's is accepted)."""

    @model_validator(mode="before")
    @classmethod
    def _ravyn_arguments(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("timezone") is None:
            data.pop("timezone", None)
        elif isinstance(data["timezone"], tzinfo):
            data["timezone"] = _tz_name(data["timezone"])
        _check_scheduler_class(data.get("scheduler_class"))
        for name, value in _from_configurations(data.get("configurations") or {}).items():
            data.setdefault(name, value)
        return data

    def _executor_aliases(self) -> dict[str, str]:
        return {alias: kind for alias, (kind, _) in _executors(self.configurations or {}).items()}


class _FieldValue:
    """Reads a field's value from the instance, hiding the parent's property of the same name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            # Absent on the class: pydantic then sees no parent attribute for the field to shadow.
            raise AttributeError(self.name)
        return instance.__dict__.get(self.name)

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__[self.name] = value


class SchedulerSettings(RavynSettings):
    """``RavynSettings`` under which ``scheduler_config: SchedulerConfig = ...`` reaches Ravyn."""

    enable_scheduler: bool = True


# Set after the class is made, so that pydantic does not take it for a field.
SchedulerSettings.scheduler_config = _FieldValue("scheduler_config")  # type: ignore[assignment]


# -- Ravyn's tasks ----------------------------------------------------------------------------

# asyncz's executor types and classes, and corral's executor for each
_EXECUTOR_KINDS = {
    "corral": "process",
    "processpool": "process",
    "threadpool": "thread",
    "pool": "thread",
    "asyncio": "asyncio",
    "corral:ProcessExecutor": "process",
    "corral._executor:ProcessExecutor": "process",
    "asyncz.executors.process_pool:ProcessPoolExecutor": "process",
    "asyncz.executors.pool:ThreadPoolExecutor": "thread",
    "asyncz.executors.asyncio:AsyncIOExecutor": "asyncio",
}


def task_arguments(
    tasks: Mapping[str, str], aliases: Mapping[str, str]
) -> list[tuple[Any, dict[str, Any]]]:
    """The ``Scheduler.add_task`` arguments of each task in ``{"name": "module"}``."""
    found = []
    for name, module_name in tasks.items():
        where = f"tasks={{{name!r}: {module_name!r}}}"
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigurationError(
                f"{where}: cannot import {module_name!r}: {exc}; check the module path"
            ) from exc
        value = getattr(module, name, None)
        if isinstance(value, _RavynTask):
            if value.is_enabled:
                found.append((value.fn, _task_options(where, value, aliases)))
        elif task_options(value) is not None:
            register(task_options(value))  # type: ignore[arg-type]
        else:
            raise ConfigurationError(
                f"{where}: {module_name}.{name} is {_kind_of(value)}; expected a task declared "
                f"with Ravyn's @scheduler(trigger=...) (or corral's @scheduler)"
            )
    return found


def _task_options(where: str, task: _RavynTask, aliases: Mapping[str, str]) -> dict[str, Any]:
    if not isinstance(task.next_run_time, Undefined):
        raise ConfigurationError(
            f"{where}: next_run_time={task.next_run_time!r} is not supported; give the trigger "
            f"a start instead, e.g. IntervalTrigger(hours=1, start_at=...)"
        )
    if task.store not in (None, "default"):
        raise ConfigurationError(
            f"{where}: store={task.store!r}; corral keeps the tasks declared in code in memory "
            f"and schedules them at each start: remove store="
        )
    executor = task.executor
    executor = DEFAULT if executor in (None, "default") else aliases.get(executor, executor)
    if executor is not DEFAULT and executor not in EXECUTOR_KINDS:
        raise ConfigurationError(
            f"{where}: executor={task.executor!r} names no executor; expected one of "
            f"{', '.join(map(repr, [*EXECUTOR_KINDS, *aliases]))}"
        )
    options: dict[str, Any] = {
        "trigger": task.trigger,
        "name": task.name,
        "id": task.id,
        "executor": executor,
        "args": task.args or (),
        "kwargs": task.kwargs or {},
    }
    for option in ("max_instances", "coalesce", "mistrigger_grace_time"):
        value = getattr(task, option)
        unset = isinstance(value, Undefined) or (
            value is None and option != "mistrigger_grace_time"
        )
        options[option] = DEFAULT if unset else value
    return options


def _kind_of(value: Any) -> str:
    if value is None:
        return "missing (None or no such name)"
    return f"{value!r}, which has no trigger" if callable(value) else repr(value)


# -- AsynczConfig's arguments -----------------------------------------------------------------

_TASK_DEFAULTS = ("max_instances", "coalesce", "mistrigger_grace_time")


def _from_configurations(configurations: Mapping[str, Any]) -> dict[str, Any]:
    """asyncz's global configuration as corral's config fields."""
    fields: dict[str, Any] = {}
    for key, value in configurations.items():
        name = key.removeprefix("asyncz.")
        if name == "timezone":
            fields["timezone"] = _tz_name(value) if isinstance(value, tzinfo) else value
        elif name.startswith("task_defaults.") and name.split(".", 1)[1] in _TASK_DEFAULTS:
            fields[name.split(".", 1)[1]] = value
        elif name.startswith(("stores.", "executors.")) or name in ("stores", "executors"):
            continue  # read by _stores and _executors
        else:
            raise ConfigurationError(
                f"configurations[{key!r}]: corral has no use for it; accepted: "
                f"'asyncz.timezone', 'asyncz.task_defaults.' + one of {', '.join(_TASK_DEFAULTS)}, "
                f"'asyncz.executors.<alias>' and 'asyncz.stores.default' of type 'memory'"
            )
    _stores(configurations)
    for alias, (kind, settings) in _executors(configurations).items():
        if alias == "default":
            fields["executor"] = kind
        for setting, value in settings.items():
            if fields.setdefault(setting, value) != value:
                raise ConfigurationError(
                    f"configurations: {setting}={value!r} for executor {alias!r} and "
                    f"{fields[setting]!r} elsewhere; corral has one process pool, with one "
                    f"{setting}"
                )
    return fields


def _nested(configurations: Mapping[str, Any], section: str) -> dict[str, dict[str, Any]]:
    """``{"asyncz.executors.pool": {...}, "asyncz.executors.pool.max_workers": 4}`` ->
    ``{"pool": {..., "max_workers": 4}}``, as asyncz reads its global configuration."""
    found: dict[str, dict[str, Any]] = {}
    for key, value in configurations.items():
        name = key.removeprefix("asyncz.")
        if name == section and isinstance(value, Mapping):
            for alias, entry in value.items():
                found.setdefault(alias, {}).update(entry)
        elif name.startswith(section + "."):
            alias, _, option = name[len(section) + 1 :].partition(".")
            if not option and not isinstance(value, Mapping):
                raise ConfigurationError(
                    f"configurations[{key!r}]={value!r}; expected a dict of the {section[:-1]}'s "
                    f"options, such as {{'type': ...}}"
                )
            found.setdefault(alias, {}).update({option: value} if option else value)
    return found


def _stores(configurations: Mapping[str, Any]) -> None:
    for alias, entry in _nested(configurations, "stores").items():
        if alias != "default" or entry.get("type", "memory") != "memory" or len(entry) > 1:
            raise ConfigurationError(
                f"configurations: task store {alias!r} ({entry!r}); corral keeps the tasks "
                f"declared in code in memory and schedules them at each start: remove "
                f"'asyncz.stores.{alias}'"
            )


def _executors(configurations: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each configured executor alias: the corral executor it stands for, and pool settings."""
    executors = {}
    for alias, entry in _nested(configurations, "executors").items():
        options = dict(entry)
        named = str(options.pop("type", None) or options.pop("class", None) or "")
        kind = _EXECUTOR_KINDS.get(named.replace("::", ":"))
        if kind is None:
            raise ConfigurationError(
                f"configurations: executor {alias!r} is {named or 'of no type'!r}; expected a "
                f"type or class among {', '.join(map(repr, _EXECUTOR_KINDS))}"
            )
        for flag in ("cancel_futures", "overwrite_wait"):
            if flag in options:
                raise ConfigurationError(
                    f"configurations: executor {alias!r} with {flag}={options[flag]!r}; it sets "
                    f"how asyncz's own shutdown treats the pool, and corral's scheduler shuts "
                    f"down by its own setting: remove {flag} and set shutdown_timeout= (seconds "
                    f"running tasks may take to finish)"
                )
        settings, _, _ = pool_options(options)
        if settings and kind != "process":
            raise ConfigurationError(
                f"configurations: executor {alias!r} ({named}) with {settings!r}; corral's "
                f"{kind} executor takes no settings of its own (workers= sets the threads)"
            )
        executors[alias] = (kind, settings)
    return executors


def _check_scheduler_class(value: Any) -> None:
    if value is None:
        return
    from asyncz.schedulers.asyncio import AsyncIOScheduler, NativeAsyncIOScheduler

    if value not in (AsyncIOScheduler, NativeAsyncIOScheduler):
        raise ConfigurationError(
            f"scheduler_class={value!r}: corral runs its own asyncio scheduler (an asyncz "
            f"AsyncIOScheduler); remove scheduler_class="
        )


def _tz_name(zone: tzinfo) -> str:
    return str(getattr(zone, "key", None) or zone.tzname(None) or zone)


def _ravyn_timezone() -> str:
    from ravyn.conf import settings

    zone = settings.timezone
    return _tz_name(zone) if isinstance(zone, tzinfo) else str(zone or "UTC")


# -- apps that would never start their scheduler ----------------------------------------------


def check_app(app: Any) -> None:
    """Log a WARNING for a corral config that this Ravyn app will never start."""
    config = getattr(app, "scheduler_config", None)
    if isinstance(config, _SchedulerConfig):
        if config.enabled and not getattr(app, "enable_scheduler", False):
            logger.warning(
                "Ravyn was given scheduler_config=%s(enabled=True) without enable_scheduler=True, "
                "so it never starts the scheduler and no task will run. Fix: "
                "Ravyn(..., enable_scheduler=True), or settings derived from "
                "corral.ravyn.SchedulerSettings",
                type(config).__name__,
            )
        return
    if config is not None:
        return
    for settings in (getattr(app, "settings_module", None), _global_settings()):
        hidden = getattr(settings, "__dict__", {}).get("scheduler_config")
        if isinstance(hidden, _RavynSchedulerConfig):
            name = type(settings).__name__
            logger.warning(
                "%s declares scheduler_config, but RavynSettings defines scheduler_config as a "
                "read-only property that returns None, so Ravyn never sees it and no task will "
                "run. Fix: derive %s from corral.ravyn.SchedulerSettings instead of RavynSettings",
                name,
                name,
            )
            return


def _global_settings() -> Any:
    forward = getattr(sys.modules.get("ravyn.conf"), "monkay", None)
    try:
        return getattr(forward, "settings", None)
    except Exception:  # settings that do not load are Ravyn's to report
        return None


def _install_app_check() -> None:
    init = Ravyn.__init__
    if getattr(init, "__corral_checks__", False):
        return

    @functools.wraps(init)
    def __init__(self: Ravyn, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        check_app(self)

    __init__.__corral_checks__ = True  # type: ignore[attr-defined]
    Ravyn.__init__ = __init__  # type: ignore[method-assign,assignment]


_install_app_check()
