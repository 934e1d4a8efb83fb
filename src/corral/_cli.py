"""The ``corral`` command: ``corral run`` and ``corral check``; ``runs`` and ``status`` read the
ledger (``corral/_cli_ledger.py``).

Errors a user can make (a module that does not import, no tasks, a bad option) end with one line
on stderr and exit status 2; ``check`` exits 1 when a task has a problem.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from corral import _cli_ledger, _cli_target
from corral._cli_logging import FORMATS, LEVELS, label_pool_output
from corral._config import SchedulerConfig
from corral._constants import DEFAULT, EXECUTOR_KINDS
from corral._decorator import TaskSpec, make_spec, next_run_times, registered_tasks
from corral._exceptions import CorralError
from corral._pool._pool import Pool
from corral._pool._refs import reference_of, resolve
from corral._runtime import Scheduler


class UsageError(Exception):
    """A mistake on the command line: reported in one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``corral`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command in ("runs", "status"):
        try:
            return _cli_ledger.main(args)
        except _cli_ledger.LedgerUsageError as exc:
            print(f"corral: {exc}", file=sys.stderr)
            return 2
    try:
        before = {spec.id for spec in registered_tasks()}
        name, attr = _cli_target.split(args.target)
        module = load(name)
        held = None if attr is None else _cli_target.attribute(module, attr, args.target)
        base = app_config(module) if attr is None else _cli_target.config_of(held, args.target)
        config = _config(base, args)
        specs = _cli_target.scheduler_tasks(held)
        if specs is None:
            specs = [
                spec
                for spec in registered_tasks()
                if spec.is_enabled
                and (spec.id not in before or spec.fn.__module__ == module.__name__)
            ]
            specs += _config_tasks(base)
        if not specs:
            raise UsageError(f"no @scheduler tasks found in {args.target!r}")
        if args.command == "check":
            return check(specs, config)
        return run(specs, config, args)
    except (UsageError, _cli_target.TargetError) as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 2


def _version() -> str:
    from importlib.metadata import version

    return version("corral")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral", description="Run scheduled tasks safely.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_ = commands.add_parser("run", help="run the tasks of a module until Ctrl-C or SIGTERM")
    check_ = commands.add_parser("check", help="validate the tasks of a module without running")
    for command in (run_, check_):
        command.add_argument(
            "target",
            help="a module name (app.tasks) or a file (app/tasks.py), optionally with :attr, "
            "a Scheduler, a SchedulerConfig or an app holding one (app.main:app)",
        )
        command.add_argument("--timezone", help="time zone of cron and date triggers")
    run_.add_argument("--workers", type=_positive_int, help="worker processes")
    run_.add_argument(
        "--database",
        help="a database shared with the other processes running these tasks, so that each "
        "fire runs once among them: sqlite:///path/to/corral.db or postgresql://... "
        "(default: $CORRAL_DATABASE)",
    )
    run_.add_argument("--executor", choices=EXECUTOR_KINDS, help="default executor of tasks")
    run_.add_argument(
        "--dask-address",
        help="the Dask scheduler that --executor dask sends runs to, tcp://host:8786 (default: "
        "$CORRAL_DASK_ADDRESS, else a local cluster of --workers processes)",
    )
    run_.add_argument(
        "--duration", type=_positive_float, help="stop after this many seconds (default: never)"
    )
    view = run_.add_mutually_exclusive_group()
    view.add_argument(
        "--live",
        dest="live",
        action="store_true",
        default=None,
        help="show the live view (default when stdout is a terminal)",
    )
    view.add_argument(
        "--plain",
        dest="live",
        action="store_false",
        help="print one log line per event instead of the live view",
    )
    run_.add_argument(
        "--log-level", choices=LEVELS, default="INFO", type=str.upper, help="default: INFO"
    )
    run_.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text: key=value lines; json: one object per line (then --plain by default)",
    )
    run_.add_argument(
        "--metrics-port",
        type=_port,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; "
        "needs corral[metrics])",
    )
    run_.add_argument(
        "--metrics-host", default="0.0.0.0", help="address to serve metrics on (default: 0.0.0.0)"
    )
    _cli_ledger.add_commands(commands)
    return parser


def _positive(convert: Callable[[str], float], expected: str) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)`` if it is above zero, else a clear error."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
        return value

    return parse


_positive_int = _positive(int, "a whole number >= 1")
_positive_float = _positive(float, "a number of seconds > 0")


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return int(text)


def load(target: str) -> ModuleType:
    """Import a module by name, or a ``.py`` file (its folder goes on ``sys.path``)."""
    path = Path(target)
    if target.endswith(".py") or path.is_file():
        if not path.is_file():
            raise UsageError(f"no such file: {target!r}")
        folder, name = str(path.resolve().parent), path.stem
        if folder not in sys.path:
            sys.path.insert(0, folder)
    else:
        name = target
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise UsageError(f"cannot import {target!r}: no module named {exc.name!r}") from None
        raise UsageError(f"cannot import {target!r}: {exc}") from None
    except CorralError as exc:
        raise UsageError(f"{target}: {exc}") from None
    except Exception as exc:
        raise UsageError(f"importing {target!r} raised {type(exc).__name__}: {exc}") from None


def _config(base: Any, args: argparse.Namespace) -> SchedulerConfig:
    """The module's app's config (see :func:`app_config`), with the command line's on top."""
    if base is not None and not isinstance(base, SchedulerConfig):
        raise UsageError(f"{args.target}: scheduler_config is {base!r}, not a SchedulerConfig")
    options: dict[str, Any] = {}
    if base is not None:  # corral's fields only: a Ravyn-style config has more
        options = {k: v for k, v in base.model_dump().items() if k in SchedulerConfig.model_fields}
    options["enabled"] = True
    for name in ("workers", "executor", "timezone", "database", "dask_address"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    try:
        return SchedulerConfig(**options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"invalid settings: {problems}") from None


def app_config(module: ModuleType) -> Any:
    """The scheduler config the module sets up: its ``scheduler_config``, else the first that a
    module-level object holds (a Ravyn app or settings as ``scheduler_config``, a
    ``Scheduler`` as ``config``), else a module-level ``SchedulerConfig``."""
    direct = getattr(module, "scheduler_config", None)
    if direct is not None:
        return direct
    values = list(vars(module).values())
    for value in values:
        if isinstance(value, ModuleType | type):
            continue
        for attribute in ("scheduler_config", "config"):
            try:
                held = getattr(value, attribute, None)
            except Exception:  # a property that cannot be read here holds no config
                held = None
            if isinstance(held, SchedulerConfig):
                return held
    return next((value for value in values if isinstance(value, SchedulerConfig)), None)


def _config_tasks(base: Any) -> list[TaskSpec]:
    """The tasks a Ravyn-style config names (``tasks={"name": "module"}``)."""
    if not isinstance(base, SchedulerConfig) or not getattr(base, "tasks", None):
        return []
    from corral.ravyn import task_arguments

    try:
        return [
            make_spec(fn, **options)
            for fn, options in task_arguments(base.tasks, base._executor_aliases())  # type: ignore[attr-defined]
        ]
    except CorralError as exc:
        raise UsageError(str(exc)) from None


# -- check ----------------------------------------------------------------------------------


def check(specs: list[TaskSpec], config: SchedulerConfig, count: int = 5) -> int:
    """Validate every task; print its next run times. Exit status 1 if any task has a problem."""
    from zoneinfo import ZoneInfo

    problems: dict[str, str] = {}
    in_workers: dict[str, str] = {}  # task id -> reference, for tasks that run in workers
    for spec in specs:
        kind = config.executor if spec.executor is DEFAULT else spec.executor
        try:
            spec.build_trigger(config.timezone)
            if kind in ("process", "dask"):
                in_workers[spec.id] = reference_of(spec.fn)
        except CorralError as exc:
            problems[spec.id] = str(exc)
    worker_problems = _importable_in_a_worker(sorted(set(in_workers.values())), config)
    for spec in specs:
        problem = problems.get(spec.id) or worker_problems.get(in_workers.get(spec.id, ""))
        if problem:
            problems[spec.id] = problem
            print(f"FAIL {spec.id}: {problem}")
            continue
        trigger = spec.build_trigger(config.timezone)
        where = in_workers.get(spec.id, f"{spec.fn.__module__}:{spec.fn.__qualname__}")
        print(f"ok   {spec.id} ({where}), next runs:")
        for moment in next_run_times(trigger, ZoneInfo(config.timezone), count):
            print(f"       {moment.isoformat()}")
    print(f"{len(specs) - len(problems)} of {len(specs)} task(s) ok")
    return 1 if problems else 0


def _importable_in_a_worker(references: list[str], config: SchedulerConfig) -> dict[str, str]:
    """Import each reference in a real worker process; return the problems by reference."""
    if not references:
        return {}
    problems: dict[str, str] = {}
    with Pool(workers=1, start_method=config.start_method, start_timeout=30) as pool:
        futures = {ref: pool.submit(_resolves, ref, timeout=30) for ref in references}
        for ref, future in futures.items():
            try:
                future.result()
            except Exception as exc:  # the worker's own words
                problems[ref] = f"a worker cannot import it: {exc}"
    return problems


def _resolves(reference: str) -> bool:
    resolve(reference)
    return True


# -- run ------------------------------------------------------------------------------------


def run(specs: list[TaskSpec], config: SchedulerConfig, args: argparse.Namespace) -> int:
    """Run the scheduler until Ctrl-C, SIGTERM or ``--duration``; drain, then exit 0, or 128 +
    the signal's number when a second signal stopped running tasks (130 for Ctrl-C)."""
    import logging

    from rich.console import Console

    from corral._cli_logging import configured
    from corral._monitor import Monitor

    text = args.log_format == "text"
    live = sys.stdout.isatty() and text if args.live is None else args.live
    stdout = sys.stdout
    console = Console(file=stdout) if live else None
    scheduler = Scheduler(config, tasks=specs)
    monitor = Monitor(scheduler, live=live, console=console)
    metrics = _serve_metrics(scheduler, args)
    zone = monitor.zone
    try:
        with configured(
            level=args.log_level, fmt=args.log_format, zone=zone, console=console, stdout=stdout
        ):
            if metrics is not None:
                logging.getLogger("corral.run").info("serving metrics at %s", metrics.url)
            return asyncio.run(_run(scheduler, monitor, args.duration, metrics))
    except CorralError as exc:
        raise UsageError(str(exc)) from None
    finally:
        if metrics is not None:
            metrics.close()


def _serve_metrics(scheduler: Scheduler, args: argparse.Namespace) -> Any:
    """``--metrics-port``: the Prometheus endpoint, serving from now on (``None`` without it)."""
    if args.metrics_port is None:
        return None
    try:
        from corral.metrics import serve
    except ImportError as exc:
        needs = f"--metrics-port needs {exc.name}"
        raise UsageError(f"{needs}: pip install 'corral[metrics]'") from None
    try:
        return serve(scheduler, args.metrics_port, args.metrics_host)
    except OSError as exc:
        where = f"{args.metrics_host}:{args.metrics_port}"
        raise UsageError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None


async def _run(scheduler: Scheduler, monitor: Any, duration: float | None, metrics: Any) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0
    status = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals, status
        signals += 1
        if signals == 1:
            monitor.note(f"{sig.name}: finishing running tasks (again to stop them now)")
            stop.set()
        else:
            monitor.note(f"{sig.name}: stopping running tasks now")
            status = 128 + sig.value
            scheduler.kill_running()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await scheduler.start()
        if scheduler.asyncz is not None:
            label_pool_output(scheduler.asyncz.executors.values())
        if metrics is not None:
            metrics.collector.attach()
        async with monitor:
            try:
                await asyncio.wait_for(stop.wait(), duration)
            except TimeoutError:
                monitor.note(f"--duration {duration:g}s reached: finishing running tasks")
            await scheduler.shutdown()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return status
