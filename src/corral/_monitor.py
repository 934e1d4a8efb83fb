"""What ``corral run`` shows: a live view on a terminal, log lines elsewhere.

Both come from the same sources: the scheduler's events (one per run outcome), the pool's
statistics, the tasks' next run times, and a heartbeat that measures the app loop's lag. Without
the view, outcomes, notes and status are records of the ``corral.run`` logger, formatted by
``corral/_cli_logging.py`` like every other line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from zoneinfo import ZoneInfo

from asyncz.events.constants import (
    TASK_ERROR,
    TASK_EXECUTED,
    TASK_MAX_INSTANCES,
    TASK_MISSED,
)
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from corral._exceptions import (
    ClusterUnavailableError,
    JobCancelledError,
    JobTimeoutError,
    MemoryLimitError,
    WorkerDiedError,
)
from corral._runtime import Scheduler

_HEARTBEAT = 0.1  # seconds between heartbeats of the app loop
_DETAIL_LIMIT = 2000  # characters of an outcome's detail kept (the view cuts to its width)
_STATUS_EVERY = 5.0  # seconds between status lines in plain mode
_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (JobTimeoutError, "timed out"),
    (WorkerDiedError, "crashed"),
    (MemoryLimitError, "memory limit"),
    (JobCancelledError, "cancelled"),
    (ClusterUnavailableError, "unreachable"),
)
_STYLES = {
    "executed": "green",
    "failed": "red",
    "timed out": "yellow",
    "crashed": "bold red",
    "memory limit": "magenta",
    "missed": "dim",
    "skipped": "dim",
    "cancelled": "dim",
    "unreachable": "bold yellow",
}


_LEVELS = {  # of an outcome's log line; the other kinds: ERROR
    "executed": logging.INFO,
    "missed": logging.WARNING,
    "skipped": logging.WARNING,
    "cancelled": logging.WARNING,
}


@dataclass(frozen=True)
class Outcome:
    at: datetime
    task: str
    kind: str
    detail: str
    traceback: str | None = None


def outcome_of(event: Any) -> Outcome | None:
    """The outcome an asyncz event reports, or ``None`` for other events."""
    now = datetime.now(UTC)
    if event.code == TASK_EXECUTED:
        value = event.return_value
        text = value if isinstance(value, str) else repr(value)
        return Outcome(now, event.task_id, "executed", _short(text))
    if event.code == TASK_MISSED:
        return Outcome(now, event.task_id, "missed", "started too late")
    if event.code == TASK_MAX_INSTANCES:
        return Outcome(now, event.task_id, "skipped", "max_instances runs in progress")
    if event.code == TASK_ERROR:
        error = event.exception
        kind = next((k for cls, k in _KINDS if isinstance(error, cls)), "failed")
        detail = _short(f"{type(error).__name__}: {error}")
        return Outcome(now, event.task_id, kind, detail, getattr(event, "traceback", None))
    return None


def _short(text: str, limit: int = _DETAIL_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Monitor:
    """Watches a running scheduler and shows it (``live``) or logs it (plain lines)."""

    def __init__(self, scheduler: Scheduler, *, live: bool, console: Console | None = None) -> None:
        self.scheduler = scheduler
        self.live = live
        self.console = console or Console()
        self.outcomes: deque[Outcome] = deque(maxlen=12)
        self.notes: deque[str] = deque(maxlen=3)
        self.lags: deque[float] = deque(maxlen=int(10 / _HEARTBEAT))
        self.started = time.monotonic()
        self.zone = ZoneInfo(scheduler.config.timezone)
        self.log = logging.getLogger("corral.run")
        self._tasks: list[asyncio.Task[None]] = []
        self._view: Live | None = None

    # -- inputs ---------------------------------------------------------------------------------

    def on_event(self, event: Any) -> None:
        outcome = outcome_of(event)
        if outcome is None:
            return
        self.outcomes.append(outcome)
        if not self.live:
            self.log.log(
                _LEVELS.get(outcome.kind, logging.ERROR),
                "%s: %s",
                outcome.kind,
                outcome.detail,
                extra={
                    "corral_event": "outcome",
                    "corral_job_label": outcome.task,
                    "corral_fields": {
                        "kind": outcome.kind.replace(" ", "_"),
                        "detail": outcome.detail,
                    },
                    "corral_traceback": outcome.traceback,
                },
            )

    def note(self, text: str) -> None:
        self.notes.append(text)
        if not self.live:
            self.log.info("%s", text, extra={"corral_event": "note"})

    # -- running --------------------------------------------------------------------------------

    async def __aenter__(self) -> Monitor:
        asyncz = self.scheduler.asyncz
        if asyncz is not None:
            asyncz.add_listener(self.on_event)
        self._tasks.append(asyncio.ensure_future(self._heartbeat()))
        if self.live:
            self._view = Live(  # the view's lines stay sys.stdout's: corral run labels them
                self.render(),
                console=self.console,
                refresh_per_second=4,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._view.start()
            self._tasks.append(asyncio.ensure_future(self._refresh()))
        else:
            self._tasks.append(asyncio.ensure_future(self._status_lines()))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._view is not None:
            self._view.update(self.render())
            self._view.stop()
        else:
            self._status()

    async def _heartbeat(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(_HEARTBEAT)
            self.lags.append(max(0.0, time.monotonic() - before - _HEARTBEAT))

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            assert self._view is not None
            self._view.update(self.render())

    async def _status_lines(self) -> None:
        while True:
            await asyncio.sleep(_STATUS_EVERY)
            self._status()

    # -- output ---------------------------------------------------------------------------------

    def lag_ms(self) -> tuple[float, float]:
        """The app loop's lag: (last, max over the last ten seconds), in milliseconds."""
        if not self.lags:
            return 0.0, 0.0
        return self.lags[-1] * 1000, max(self.lags) * 1000

    def _status(self) -> None:
        stats = self.scheduler.statistics()
        last, worst = self.lag_ms()
        fields: dict[str, Any] = {"loop_lag_ms": round(last, 1), "loop_lag_max_ms": round(worst, 1)}
        if stats is not None:
            fields.update(
                workers=len(stats.workers),
                busy=stats.running,
                queued=stats.queued,
                completed=stats.completed,
                failed=stats.failed,
                timed_out=stats.timed_out,
                crashed=stats.crashed,
                memory_exceeded=stats.memory_exceeded,
                missed=stats.missed,
                cancelled=stats.cancelled,
                recycled=stats.recycled,
                restarts=stats.restarts,
                start_failures=stats.start_failures,
            )
        cluster = self.scheduler.cluster_statistics()
        if cluster is not None:
            fields.update(
                dask_connected=cluster.connected,
                dask_workers=len(cluster.workers),
                dask_running=cluster.running,
                dask_waiting=cluster.waiting,
                dask_completed=cluster.completed,
                dask_failed=cluster.failed,
                dask_timed_out=cluster.timed_out,
                dask_crashed=cluster.crashed,
                dask_unavailable=cluster.unavailable,
            )
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        self.log.info("status: %s", text, extra={"corral_event": "status", "corral_fields": fields})

    def _clock(self, moment: datetime) -> str:
        """A time of day in the scheduler's time zone, with the zone's name."""
        return moment.astimezone(self.zone).strftime("%H:%M:%S %Z")

    def render(self) -> Group:
        """The live view: workers, recent outcomes, next runs, and the loop's lag."""
        stats = self.scheduler.statistics()
        last, worst = self.lag_ms()
        uptime = time.monotonic() - self.started
        header = Text.assemble(
            ("corral ", "bold"),
            f"up {uptime:.0f}s   app loop lag {last:.1f} ms (max {worst:.1f} ms over 10 s)",
        )
        workers = Table(
            "worker",
            "state",
            "task",
            "elapsed",
            "RSS",
            "jobs",
            title="Workers",
            title_justify="left",
            expand=False,
        )
        if stats is not None:
            for w in stats.workers:
                workers.add_row(
                    str(w.pid),
                    w.state,
                    w.job_label or "",
                    "" if w.running_for is None else f"{w.running_for:.1f}s",
                    "" if w.rss is None else size(w.rss),
                    str(w.jobs_done),
                )
            counters = Text(
                f"completed {stats.completed}  failed {stats.failed}  timed out "
                f"{stats.timed_out}  crashed {stats.crashed}  memory {stats.memory_exceeded}  "
                f"missed {stats.missed}  cancelled {stats.cancelled}  recycled {stats.recycled}  "
                f"restarts {stats.restarts}  start failures {stats.start_failures}  "
                f"queued {stats.queued}"
            )
        elif self.scheduler.cluster_statistics() is not None:
            counters = Text("no local worker pool (tasks run on the Dask cluster)")
        else:
            counters = Text("no worker pool (thread or asyncio executor)")
        outcomes = Table(title="Recent outcomes", title_justify="left", expand=True)
        for column in ("when", "task", "outcome"):
            outcomes.add_column(column, no_wrap=True)
        outcomes.add_column("detail", no_wrap=True, overflow="ellipsis", ratio=1)
        for outcome in reversed(self.outcomes):
            outcomes.add_row(
                self._clock(outcome.at),
                outcome.task,
                Text(outcome.kind, style=_STYLES.get(outcome.kind, "")),
                outcome.detail,
            )
        upcoming = Table("task", "next run", "in", title="Next runs", title_justify="left")
        now = datetime.now(UTC)
        runs = [(t.next_run_time, str(t.id)) for t in self.scheduler.tasks() if t.next_run_time]
        for due, task_id in sorted(runs):
            upcoming.add_row(task_id, self._clock(due), f"{(due - now).total_seconds():.0f}s")
        notes = Text("\n".join(self.notes), style="bold yellow")
        cluster = self._cluster_view()
        parts: list[RenderableType] = (
            [header, counters, workers] if cluster is None else [header, *cluster]
        )
        if cluster is not None and stats is not None:
            parts += [counters, workers]
        return Group(*parts, outcomes, upcoming, notes)

    def _cluster_view(self) -> tuple[Text, Table] | None:
        """The Dask cluster's workers and corral's runs on it, if tasks run there."""
        cluster = self.scheduler.cluster_statistics()
        if cluster is None:
            return None
        state = "connected" if cluster.connected else "UNAVAILABLE (reconnecting)"
        counters = Text(
            f"Dask cluster {cluster.address} ({'embedded' if cluster.embedded else 'external'}, "
            f"{state}): running {cluster.running}  waiting {cluster.waiting}  completed "
            f"{cluster.completed}  failed {cluster.failed}  timed out {cluster.timed_out}  "
            f"crashed {cluster.crashed}  unreachable {cluster.unavailable}"
        )
        table = Table(
            "Dask worker",
            "pid",
            "state",
            "task",
            "elapsed",
            "memory",
            "runs",
            title="Dask workers",
            title_justify="left",
            expand=False,
        )
        for w in cluster.workers:
            table.add_row(
                w.address,
                "" if w.pid is None else str(w.pid),
                "busy" if w.running else "idle",
                ", ".join(w.running),
                "" if w.running_for is None else f"{w.running_for:.1f}s",
                "" if w.memory is None else size(w.memory),
                str(w.runs_done),
            )
        return counters, table


def size(amount: int) -> str:
    """Bytes as MiB, or GiB from 1 GiB on."""
    if amount >= 2**30:
        return f"{amount / 2**30:.2f} GiB"
    return f"{amount / 2**20:.0f} MiB"
