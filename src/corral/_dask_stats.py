"""What the Dask executor reports about its cluster (free of Dask imports)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterWorker:
    """One Dask worker, as the scheduler and corral's runs last saw it."""

    address: str
    pid: int | None
    """The worker process's pid, once a corral run started there."""
    nthreads: int
    memory: int | None
    """The worker process's memory (bytes), from the scheduler's last heartbeat."""
    memory_limit: int | None
    nanny: bool
    """Whether a nanny supervises it (needed to stop a run past its timeout)."""
    running: tuple[str, ...]
    """Labels (task ids) of the corral runs it runs now."""
    running_for: float | None
    """Seconds the longest of them has run."""
    runs_done: int
    """corral runs it ended (whatever their outcome)."""


@dataclass(frozen=True)
class ClusterStatistics:
    """A snapshot of the cluster and of the runs corral sent to it."""

    address: str
    embedded: bool
    """Whether corral started the cluster (a ``LocalCluster``)."""
    connected: bool
    workers: tuple[ClusterWorker, ...]
    running: int
    """Runs that have started and have no outcome yet."""
    waiting: int
    """Runs sent (or about to be) that have not started yet."""
    submitted: int
    completed: int
    failed: int
    timed_out: int
    crashed: int
    unavailable: int
    cancelled: int
