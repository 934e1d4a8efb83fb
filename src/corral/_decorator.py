"""``@scheduler``: declare a task next to its function, validated when the module is imported.

The decorator returns the function itself, so it stays directly callable and picklable by
reference; its options live in one attribute, ``__corral_task__``, and in a registry that the
scheduler reads when it starts.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import sys
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from corral._constants import DEFAULT, EXECUTOR_KINDS, ExecutorKind
from corral._exceptions import ConfigurationError, NotImportableError
from corral._pool import _worker
from corral._pool._refs import check_importable

if TYPE_CHECKING:
    from asyncz.triggers.types import TriggerType

F = TypeVar("F", bound=Callable[..., Any])
TriggerName = Literal["interval", "cron", "date"]

TRIGGER_NAMES = ("interval", "cron", "date")
_MAIN_NAMES = ("__main__", "__mp_main__")  # names a script is imported under
logger = logging.getLogger("corral.scheduler")
# APScheduler's and Ravyn's names for asyncz's run_at, start_at and end_at
_ALIASES = {
    "date": {"run_date": "run_at"},
    "interval": {"start_date": "start_at", "end_date": "end_at"},
    "cron": {"start_date": "start_at", "end_date": "end_at"},
}
_DURATIONS = ("weeks", "days", "hours", "minutes", "seconds")


@dataclass(frozen=True)
class TaskSpec:
    """A task as declared: its function, trigger and options (unset options are ``DEFAULT``)."""

    fn: Callable[..., Any]
    id: str
    name: str
    trigger: str | TriggerType
    trigger_args: Mapping[str, Any] = field(default_factory=dict)
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    max_instances: Any = DEFAULT
    coalesce: Any = DEFAULT
    mistrigger_grace_time: Any = DEFAULT
    executor: Any = DEFAULT
    timeout: Any = DEFAULT
    is_enabled: bool = True
    rerun_lost: bool = False

    def build_trigger(self, timezone: str) -> TriggerType:
        """The asyncz trigger, in ``timezone`` unless the task chose its own."""
        return build_trigger(self.trigger, self.trigger_args, timezone, self.id)


_registry: dict[str, TaskSpec] = {}


def registered_tasks() -> list[TaskSpec]:
    """Every task declared with ``@scheduler`` in this process so far, in declaration order."""
    return list(_registry.values())


def task_options(fn: Any) -> TaskSpec | None:
    """The ``@scheduler`` options of ``fn``, if it has any."""
    spec = getattr(fn, "__corral_task__", None)
    return spec if isinstance(spec, TaskSpec) else None


def scheduler(
    *,
    name: str | None = None,
    trigger: TriggerName | TriggerType | None = None,
    id: str | None = None,
    max_instances: int = DEFAULT,
    coalesce: bool = DEFAULT,
    mistrigger_grace_time: float | None = DEFAULT,
    executor: ExecutorKind = DEFAULT,
    timeout: float | None = DEFAULT,
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    is_enabled: bool = True,
    rerun_lost: bool = False,
    **trigger_args: Any,
) -> Callable[[F], F]:
    """Declare the decorated function as a scheduled task; return the function unchanged.

    Args:
        name: The task's name; also its id unless ``id`` is given.
        trigger: ``"interval"``, ``"cron"``, ``"date"`` or an asyncz trigger instance.
        id: A stable id (default: ``name``, else ``module:function``).
        max_instances: Runs of this task that may be in progress at once.
        coalesce: After a delay, run once instead of once per missed run time.
        mistrigger_grace_time: Seconds a run may start late before it is reported missed.
        executor: ``"process"``, ``"thread"``, ``"asyncio"`` or ``"dask"``.
        timeout: Seconds a run may take (process executor); ``None`` for no limit.
        args: Positional arguments for the function.
        kwargs: Keyword arguments for the function.
        is_enabled: ``False`` declares the task without scheduling it.
        rerun_lost: With a database: run a fire again when the replica that ran it died
            before reporting its outcome (the run is reported lost either way).
        **trigger_args: The trigger's arguments, e.g. ``hours=1`` or ``hour=9, minute=0``.

    Raises:
        ConfigurationError: an unknown trigger, a misspelt or invalid trigger argument, an
            invalid option, or a function that cannot run in a worker process.
    """
    if _worker.RUNNING_IN_WORKER:
        # A worker imports a task's module to run the function: it schedules nothing, so it
        # neither validates again nor loads the scheduler's dependencies.
        return _unchanged
    declared = _declare(  # validated here, at the decorator line, before the function is known
        name or id or "task",
        name=name,
        trigger=trigger,
        id=id,
        max_instances=max_instances,
        coalesce=coalesce,
        mistrigger_grace_time=mistrigger_grace_time,
        executor=executor,
        timeout=timeout,
        args=args,
        kwargs=kwargs,
        is_enabled=is_enabled,
        rerun_lost=rerun_lost,
        trigger_args=trigger_args,
    )

    def decorate(fn: F) -> F:
        spec = _bind(declared, fn)
        register(spec)
        fn.__corral_task__ = spec  # type: ignore[attr-defined]
        return fn

    return decorate


def _unchanged(fn: F) -> F:
    return fn


def make_spec(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    trigger: str | TriggerType | None = None,
    id: str | None = None,
    max_instances: Any = DEFAULT,
    coalesce: Any = DEFAULT,
    mistrigger_grace_time: Any = DEFAULT,
    executor: Any = DEFAULT,
    timeout: Any = DEFAULT,
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    is_enabled: bool = True,
    rerun_lost: bool = False,
    **trigger_args: Any,
) -> TaskSpec:
    """Validate a task declaration and return it (``@scheduler`` without the registry)."""
    declared = _declare(
        name or id or _reference(fn),
        name=name,
        trigger=trigger,
        id=id,
        max_instances=max_instances,
        coalesce=coalesce,
        mistrigger_grace_time=mistrigger_grace_time,
        executor=executor,
        timeout=timeout,
        args=args,
        kwargs=kwargs,
        is_enabled=is_enabled,
        rerun_lost=rerun_lost,
        trigger_args=trigger_args,
    )
    return _bind(declared, fn)


def _declare(
    label: str,
    *,
    name: str | None,
    trigger: str | TriggerType | None,
    id: str | None,
    max_instances: Any,
    coalesce: Any,
    mistrigger_grace_time: Any,
    executor: Any,
    timeout: Any,
    args: Iterable[Any],
    kwargs: Mapping[str, Any] | None,
    is_enabled: bool,
    trigger_args: Mapping[str, Any],
    rerun_lost: bool = False,
) -> TaskSpec:
    """Check a declaration once; the result waits for its function (see :func:`_bind`)."""
    if trigger is None:
        raise ConfigurationError(
            f"task {label!r} needs a trigger: trigger='interval' (with e.g. hours=1), "
            "trigger='cron' (with e.g. hour=9, minute=0) or trigger='date' (with run_date=...)"
        )
    _check_options(max_instances, mistrigger_grace_time, executor, timeout)
    if timeout not in (DEFAULT, None) and executor in ("thread", "asyncio"):
        raise ConfigurationError(
            f"task {label!r}: timeout={timeout!r} needs executor='process'; a thread or the "
            f"event loop cannot be stopped from outside"
        )
    build_trigger(trigger, trigger_args, "UTC", label)
    return TaskSpec(
        fn=_unchanged,
        id=id or "",
        name=name or "",
        trigger=trigger,
        trigger_args=dict(trigger_args),
        args=tuple(args),
        kwargs=dict(kwargs or {}),
        max_instances=max_instances,
        coalesce=coalesce,
        mistrigger_grace_time=mistrigger_grace_time,
        executor=executor,
        timeout=timeout,
        is_enabled=is_enabled,
        rerun_lost=bool(rerun_lost),
    )


def _bind(declared: TaskSpec, fn: Callable[..., Any]) -> TaskSpec:
    """The declared task, for ``fn``: its id and name default to the function's."""
    if not callable(fn):
        raise ConfigurationError(f"a task needs a function, not {fn!r}")
    reference = _reference(fn)
    if declared.executor in (DEFAULT, "process", "dask"):
        try:
            check_importable(fn)
        except NotImportableError as exc:
            raise ConfigurationError(
                f"task {declared.name or declared.id or reference!r}: {exc} (or choose "
                f"executor='thread' or 'asyncio')"
            ) from None
    return replace(
        declared,
        fn=fn,
        id=declared.id or declared.name or reference,
        name=declared.name or str(getattr(fn, "__name__", reference)),
    )


def register(spec: TaskSpec) -> None:
    """Add ``spec`` to the registry; the same function declared again replaces itself."""
    existing = _registry.get(spec.id)
    if existing is not None and _reference(existing.fn) != _reference(spec.fn):
        if _imported_twice(spec.id, existing.fn, spec.fn):
            if _module_of(existing.fn) in _MAIN_NAMES:
                _registry[spec.id] = spec  # the module's own name: workers import it as that
            return
        raise ConfigurationError(
            f"task id {spec.id!r} is already used by {_reference(existing.fn)}; "
            f"give {_reference(spec.fn)} another name= or id="
        )
    _registry[spec.id] = spec


def _imported_twice(task_id: str, first: Callable[..., Any], second: Callable[..., Any]) -> bool:
    """Whether two declarations are one function of one file, imported under two names: as the
    script (``__main__``) and as itself, as ``uvicorn.run("main:app")`` in ``main.py`` does."""
    names = {_module_of(first), _module_of(second)}
    qualname = getattr(first, "__qualname__", None)
    if len(names & set(_MAIN_NAMES)) != 1 or qualname != getattr(second, "__qualname__", ""):
        return False
    path = _source_file(first)
    if path is None or path != _source_file(second):
        return False
    (script,) = names & set(_MAIN_NAMES)
    (module,) = names - set(_MAIN_NAMES)
    logger.warning(
        "Task %r is declared twice, as %s:%s and %s:%s: %s was imported twice, as the script "
        "(%s) and as %r (uvicorn.run('%s:app') in that script does this), so its module-level "
        "code ran twice. corral schedules %s:%s. To import the file once: start the server with "
        "the module's name (uvicorn %s:app), pass it the app object (uvicorn.run(app)), or move "
        "the tasks to a module of their own",
        task_id,
        script,
        qualname,
        module,
        qualname,
        path,
        script,
        module,
        module,
        module,
        qualname,
        module,
    )
    return True


def _module_of(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__module__", ""))


def _source_file(fn: Callable[..., Any]) -> str | None:
    code = getattr(fn, "__code__", None)
    path = getattr(code, "co_filename", None) or getattr(
        sys.modules.get(_module_of(fn)), "__file__", None
    )
    return os.path.realpath(path) if isinstance(path, str) else None


def unregister(task_id: str) -> None:
    """Forget a declared task (for tests that declare tasks of their own)."""
    _registry.pop(task_id, None)


def _reference(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def build_trigger(
    trigger: str | TriggerType, trigger_args: Mapping[str, Any], timezone: str, label: str
) -> TriggerType:
    """Make an asyncz trigger, refusing what asyncz would silently misread."""
    from asyncz.triggers.types import TriggerType

    if isinstance(trigger, TriggerType):
        if trigger_args:
            raise ConfigurationError(
                f"task {label!r}: trigger arguments {sorted(trigger_args)} given with a trigger "
                f"instance; put them in the trigger instead"
            )
        return trigger
    if trigger not in TRIGGER_NAMES:
        raise ConfigurationError(
            f"task {label!r}: unknown trigger {trigger!r}; expected one of "
            f"{', '.join(repr(t) for t in TRIGGER_NAMES)} or an asyncz trigger instance"
        )
    cls = _trigger_class(trigger)
    args = _canonical_args(trigger, trigger_args, label)
    if trigger == "interval":
        _check_interval(args, label)
    if isinstance(args.get("timezone"), str):
        check_timezone(args["timezone"], f"task {label!r}: ")
    args.setdefault("timezone", timezone)
    try:
        return cls(**args)
    except (ValueError, TypeError, zoneinfo.ZoneInfoNotFoundError) as exc:
        raise ConfigurationError(f"task {label!r}: invalid {trigger} trigger: {exc}") from None


def check_timezone(name: str, context: str = "") -> str:
    """Refuse a time zone name that is not an IANA one, suggesting the closest."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        close = difflib.get_close_matches(name, sorted(zoneinfo.available_timezones()), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigurationError(
            f"{context}unknown time zone {name!r}; {hint}use an IANA name such as 'UTC' or "
            f"'Europe/Paris'"
        ) from None
    return name


def _trigger_class(name: str) -> type[TriggerType]:
    from asyncz.triggers import CronTrigger, DateTrigger, IntervalTrigger

    classes: dict[str, type[TriggerType]] = {
        "interval": IntervalTrigger,
        "cron": CronTrigger,
        "date": DateTrigger,
    }
    return classes[name]


def _canonical_args(trigger: str, trigger_args: Mapping[str, Any], label: str) -> dict[str, Any]:
    aliases = _ALIASES.get(trigger, {})
    accepted = [
        p
        for p in inspect.signature(_trigger_class(trigger).__init__).parameters
        if p not in ("self", "kwargs")
    ]
    args: dict[str, Any] = {}
    for key, value in trigger_args.items():
        canonical = aliases.get(key, key)
        if canonical not in accepted:
            close = difflib.get_close_matches(key, accepted + list(aliases), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(
                f"task {label!r}: the {trigger} trigger has no argument {key!r}{hint} "
                f"(accepted: {', '.join(accepted + list(aliases))})"
            )
        args[canonical] = value
    return args


def _check_interval(args: Mapping[str, Any], label: str) -> None:
    for key in _DURATIONS:
        value = args.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigurationError(
                f"task {label!r}: interval {key}={value!r}; expected a number >= 0"
            )
    if not any(args.get(key) for key in _DURATIONS):
        raise ConfigurationError(
            f"task {label!r}: an interval trigger needs a length: one of "
            f"{', '.join(_DURATIONS)} (for example hours=1)"
        )


def _check_options(max_instances: Any, grace: Any, executor: Any, timeout: Any) -> None:
    if max_instances is not DEFAULT and (
        isinstance(max_instances, bool) or not isinstance(max_instances, int) or max_instances < 1
    ):
        raise ConfigurationError(f"max_instances={max_instances!r}; expected an integer >= 1")
    for option, value in (("mistrigger_grace_time", grace), ("timeout", timeout)):
        if value is DEFAULT or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigurationError(
                f"{option}={value!r}; expected a positive number of seconds, or None"
            )
    if executor is not DEFAULT and executor not in EXECUTOR_KINDS:
        raise ConfigurationError(
            f"executor={executor!r}; expected one of {', '.join(map(repr, EXECUTOR_KINDS))}"
        )


def next_run_times(trigger: TriggerType, timezone: Any, count: int) -> list[datetime]:
    """The next ``count`` run times of ``trigger`` from now."""
    times: list[datetime] = []
    now = datetime.now(timezone)
    previous = None
    while len(times) < count:
        moment = trigger.get_next_trigger_time(timezone, previous, now)
        if moment is None:
            break
        times.append(moment)
        previous = moment
        now = moment
    return times
