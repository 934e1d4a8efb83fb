"""Snapshots of a pool's state, returned by ``Pool.statistics()``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WorkerState = Literal["starting", "idle", "busy", "stopping", "killing"]


@dataclass(frozen=True)
class WorkerStatistics:
    """One worker at the moment of the snapshot."""

    pid: int
    state: WorkerState
    job_id: int | None
    job_label: str | None
    running_for: float | None
    """Seconds the current job has been running, or ``None`` when idle."""
    rss: int | None
    """Resident memory in bytes, or ``None`` if it could not be read."""
    jobs_done: int
    waiting: int = 0
    """Jobs sent to this worker behind its current one, not started yet (when jobs pile up)."""


@dataclass(frozen=True)
class PoolStatistics:
    """Counters since the pool started, and every worker's state."""

    workers: tuple[WorkerStatistics, ...]
    submitted: int
    completed: int
    """Jobs that returned a value."""
    failed: int
    """Jobs that raised (including results or exceptions that could not be transported)."""
    timed_out: int
    crashed: int
    memory_exceeded: int
    missed: int
    cancelled: int
    recycled: int
    restarts: int
    """Workers started to replace one that died, was killed or was recycled."""
    start_failures: int
    queued: int
    running: int
    waited: int = 0
    """Jobs that waited more than a second for a worker (the pool was busy or starting)."""
    output_dropped: int = 0
    """Characters of jobs' output that never reached the app's ``sys.stdout``/``sys.stderr``:
    they were broken (a closed pipe) or so slow that the output waiting for them passed its
    bound (a pipe nobody reads)."""
    logs_dropped: int = 0
    """Log records of jobs that never reached the app's handlers (one raised, or they were so
    slow that the records waiting for them passed their bound)."""

    @property
    def finished(self) -> int:
        """Jobs that reached an outcome."""
        return (
            self.completed
            + self.failed
            + self.timed_out
            + self.crashed
            + self.memory_exceeded
            + self.missed
            + self.cancelled
        )
