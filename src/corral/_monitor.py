"""What ``corral run`` shows: a live view on a terminal, plain ``key=value`` lines elsewhere.

Both come from the same sources: the scheduler's events (one per run outcome), the pool's
statistics, the tasks' next run times, and a heartbeat that measures the app loop's lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

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


@dataclass(frozen=True)
class Outcome:
    at: datetime
    task: str
    kind: str
    detail: str


def outcome_of(event: Any) -> Outcome | None:
    """The outcome an asyncz event reports, or ``None`` for other events."""
    now = datetime.now(UTC)
    if event.code == TASK_EXECUTED:
        return Outcome(now, event.task_id, "executed", _short(repr(event.return_value)))
    if event.code == TASK_MISSED:
        return Outcome(now, event.task_id, "missed", "started too late")
    if event.code == TASK_MAX_INSTANCES:
        return Outcome(now, event.task_id, "skipped", "max_instances runs in progress")
    if event.code == TASK_ERROR:
        error = event.exception
        kind = next((k for cls, k in _KINDS if isinstance(error, cls)), "failed")
        return Outcome(now, event.task_id, kind, _short(f"{type(error).__name__}: {error}"))
    return None


def _short(text: str, limit: int = 90) -> str:
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
        self._tasks: list[asyncio.Task[None]] = []
        self._view: Live | None = None

    # -- inputs ---------------------------------------------------------------------------------

    def on_event(self, event: Any) -> None:
        outcome = outcome_of(event)
        if outcome is None:
            return
        self.outcomes.append(outcome)
        if not self.live:
            self._line(
                "outcome",
                task=outcome.task,
                kind=outcome.kind.replace(" ", "_"),
                detail=outcome.detail,
            )

    def note(self, text: str) -> None:
        self.notes.append(text)
        if not self.live:
            self._line("note", text=text)

    # -- running --------------------------------------------------------------------------------

    async def __aenter__(self) -> Monitor:
        asyncz = self.scheduler.asyncz
        if asyncz is not None:
            asyncz.add_listener(self.on_event)
        self._tasks.append(asyncio.ensure_future(self._heartbeat()))
        if self.live:
            self._view = Live(
                self.render(), console=self.console, refresh_per_second=4, transient=False
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
        fields: dict[str, Any] = {"loop_lag_ms": f"{last:.1f}", "loop_lag_max_ms": f"{worst:.1f}"}
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
                recycled=stats.recycled,
                restarts=stats.restarts,
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
        self._line("status", **fields)

    def _line(self, kind: str, /, **fields: Any) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        parts = [f"time={stamp}", f"event={kind}"]
        for key, value in fields.items():
            text = str(value)
            parts.append(f"{key}={text!r}" if " " in text or not text else f"{key}={text}")
        print(" ".join(parts), flush=True)

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
                    "" if w.rss is None else f"{w.rss / 2**20:.0f} MiB",
                    str(w.jobs_done),
                )
            counters = Text(
                f"completed {stats.completed}  failed {stats.failed}  timed out "
                f"{stats.timed_out}  crashed {stats.crashed}  memory {stats.memory_exceeded}  "
                f"recycled {stats.recycled}  restarts {stats.restarts}  queued {stats.queued}"
            )
        elif self.scheduler.cluster_statistics() is not None:
            counters = Text("no local worker pool (tasks run on the Dask cluster)")
        else:
            counters = Text("no worker pool (thread or asyncio executor)")
        outcomes = Table(
            "when", "task", "outcome", "detail", title="Recent outcomes", title_justify="left"
        )
        for outcome in reversed(self.outcomes):
            outcomes.add_row(
                outcome.at.strftime("%H:%M:%S"),
                outcome.task,
                Text(outcome.kind, style=_STYLES.get(outcome.kind, "")),
                outcome.detail,
            )
        upcoming = Table("task", "next run", "in", title="Next runs", title_justify="left")
        now = datetime.now(UTC)
        runs = [(t.next_run_time, str(t.id)) for t in self.scheduler.tasks() if t.next_run_time]
        for due, task_id in sorted(runs):
            upcoming.add_row(
                task_id, due.strftime("%H:%M:%S"), f"{(due - now).total_seconds():.0f}s"
            )
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
                "" if w.memory is None else f"{w.memory / 2**20:.0f} MiB",
                str(w.runs_done),
            )
        return counters, table
