"""asyncz's names for corral: the ``"corral"`` executor type, and asyncz's pool arguments.

- ``{"type": "corral"}`` in an asyncz executor config names :class:`corral.ProcessExecutor`.
  asyncz looks ``type`` names up in ``asyncz.schedulers.defaults.executors``, a dict each
  scheduler copies when it is made, and offers no entry point: :func:`register_alias` adds
  corral's name there. ``import corral`` calls it, and must not import asyncz (worker processes
  import corral too), so when asyncz is not loaded yet the name is added right after asyncz
  loads that module.
- :func:`pool_options` reads the arguments of asyncz's ``ProcessPoolExecutor`` as pool settings.

This module imports nothing beyond the standard library.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from corral._exceptions import ConfigurationError

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

ALIAS = "corral"
_TARGET = "corral:ProcessExecutor"
_DEFAULTS = "asyncz.schedulers.defaults"


def register_alias() -> None:
    """Make ``"corral"`` an asyncz executor type, now or as soon as asyncz's defaults load."""
    defaults = sys.modules.get(_DEFAULTS)
    if defaults is not None:
        _add_alias(defaults)
    elif not any(isinstance(finder, _AliasOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AliasOnImport())


def _add_alias(defaults: ModuleType) -> None:
    executors = getattr(defaults, "executors", None)
    if isinstance(executors, dict):
        executors.setdefault(ALIAS, _TARGET)


class _AliasOnImport:
    """An import hook that waits for asyncz's defaults module, adds the alias once that module
    has run, and then leaves ``sys.meta_path``. Every other import passes straight through."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> ModuleSpec | None:
        if name != _DEFAULTS:
            return None
        spec: ModuleSpec | None = None
        for finder in list(sys.meta_path):
            find = None if finder is self else getattr(finder, "find_spec", None)
            spec = None if find is None else find(name, path, target)
            if spec is not None:
                break
        loader: Any = None if spec is None else spec.loader
        run = getattr(loader, "exec_module", None)
        if run is None:
            return spec

        def exec_module(module: ModuleType) -> None:
            run(module)
            _add_alias(module)
            if self in sys.meta_path:  # no import is looking through the list at this point
                sys.meta_path.remove(self)

        loader.exec_module = exec_module
        return spec


# -- asyncz's ProcessPoolExecutor arguments ---------------------------------------------------

# concurrent.futures.ProcessPoolExecutor's arguments (asyncz's pool_kwargs) -> pool settings
_POOL_KWARGS = {
    "max_workers": "workers",
    "mp_context": "start_method",
    "initializer": "initializer",
    "initargs": "initargs",
    "max_tasks_per_child": "max_jobs_per_worker",
}
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def pool_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], bool | None, bool]:
    """Read asyncz's ``ProcessPoolExecutor`` arguments in ``options`` as pool settings.

    Returns the options with ``max_workers`` and ``pool_kwargs`` turned into corral's settings,
    ``overwrite_wait`` (``None`` unless given) and ``cancel_futures`` (``False`` unless given).

    Raises:
        ConfigurationError: an argument corral has no equivalent for, or one given twice.
    """
    settings = dict(options)
    if "max_workers" in settings:
        _set(settings, "max_workers", "workers", settings.pop("max_workers"))
    pool_kwargs = settings.pop("pool_kwargs", None) or {}
    if not isinstance(pool_kwargs, Mapping):
        raise ConfigurationError(
            f"pool_kwargs={pool_kwargs!r}; expected a dict of concurrent.futures."
            f"ProcessPoolExecutor arguments ({', '.join(_POOL_KWARGS)})"
        )
    for key, value in pool_kwargs.items():
        setting = _POOL_KWARGS.get(key)
        if setting is None:
            raise ConfigurationError(
                f"pool_kwargs={{{key!r}: {value!r}}}: corral has no equivalent of {key!r}; "
                f"accepted in pool_kwargs: {', '.join(_POOL_KWARGS)} (or pass corral's own "
                f"settings, such as workers=, timeout=, max_memory=, as keywords)"
            )
        _set(
            settings,
            f"pool_kwargs[{key!r}]",
            setting,
            _start_method(value) if key == "mp_context" else value,
        )
    cancel_futures = _flag("cancel_futures", settings.pop("cancel_futures", False))
    overwrite_wait = settings.pop("overwrite_wait", None)
    if overwrite_wait is not None:
        overwrite_wait = _flag("overwrite_wait", overwrite_wait)
    return settings, overwrite_wait, cancel_futures


def _set(settings: dict[str, Any], given: str, setting: str, value: Any) -> None:
    if setting in settings:
        raise ConfigurationError(
            f"{given}={value!r} and {setting}={settings[setting]!r} are both given, and they are "
            f"the same setting; keep only {setting}="
        )
    settings[setting] = value


def _start_method(context: Any) -> Any:
    """A multiprocessing context (``mp_context``) -> its start method's name."""
    get = getattr(context, "get_start_method", None)
    return context if get is None else get()


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigurationError(f"{name}={value!r}; expected True or False")
