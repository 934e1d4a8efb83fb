"""Ravyn integration: ``SchedulerConfig`` as Ravyn types it, and settings that reach Ravyn.

- :class:`SchedulerConfig` is corral's config that is also a Ravyn scheduler config, so that
  ``Ravyn(scheduler_config=...)`` type-checks.
- ``RavynSettings`` defines ``scheduler_config`` as a read-only property that returns ``None``,
  so a settings class that declares ``scheduler_config: SchedulerConfig = ...`` is silently
  ignored, and Ravyn starts a scheduler only when ``enable_scheduler`` is true. Derive from
  :class:`SchedulerSettings` instead of ``RavynSettings`` and both are taken care of.
"""

from __future__ import annotations

from typing import Any

from pydantic._internal._model_construction import ModelMetaclass
from ravyn import RavynSettings
from ravyn.contrib.schedulers.base import SchedulerConfig as _RavynSchedulerConfig

from corral._config import SchedulerConfig as _SchedulerConfig

__all__ = ["SchedulerConfig", "SchedulerSettings"]


class _ConfigMeta(ModelMetaclass, type(_RavynSchedulerConfig)):  # type: ignore[misc]
    """Pydantic's metaclass and that of Ravyn's (protocol) base class, reconciled."""


# Ravyn's base declares start(**kwargs)/shutdown(**kwargs); Ravyn calls them with no arguments.
class SchedulerConfig(_SchedulerConfig, _RavynSchedulerConfig, metaclass=_ConfigMeta):  # type: ignore[misc]
    """:class:`corral.SchedulerConfig`, typed as the scheduler config Ravyn expects."""


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
