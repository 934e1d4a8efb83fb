"""Prometheus metrics of a corral scheduler (needs ``corral[metrics]``: ``prometheus_client``).

:class:`CorralCollector` is a custom collector for an app's own registry:
``registry.register(CorralCollector(scheduler))``. It reads ``Scheduler.statistics()`` (the
pool's workers and counters), ``ledger_statistics()`` and ``cluster_statistics()`` at each
scrape, and counts the runs' outcomes, durations and waits from the scheduler's events as they
happen. :func:`serve` is what ``corral run --metrics-port`` starts.

Only this module imports ``prometheus_client``; ``import corral`` does not.
"""

from __future__ import annotations

import asyncio
import threading
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from asyncz.events.constants import TASK_ERROR, TASK_EXECUTED, TASK_MAX_INSTANCES, TASK_MISSED
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from corral._config import SchedulerConfig
from corral._exceptions import (
    ClusterUnavailableError,
    JobCancelledError,
    JobTimeoutError,
    MemoryLimitError,
    WorkerDiedError,
)
from corral._runtime import Scheduler

__all__ = [
    "DURATION_BUCKETS",
    "WAIT_BUCKETS",
    "CorralCollector",
    "MetricsServer",
    "outcome_of",
    "serve",
]

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)
"""Upper bounds (seconds) of ``corral_run_duration_seconds``."""
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
"""Upper bounds (seconds) of ``corral_run_queue_wait_seconds``."""

_LAG_WINDOW = 10.0  # seconds over which corral_event_loop_lag_max_seconds is the maximum
_OUTCOMES = (
    "completed",
    "failed",
    "timed_out",
    "crashed",
    "memory_exceeded",
    "missed",
    "cancelled",
)
_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (JobTimeoutError, "timed_out"),
    (WorkerDiedError, "crashed"),
    (MemoryLimitError, "memory_exceeded"),
    (JobCancelledError, "cancelled"),
    (ClusterUnavailableError, "unreachable"),
)
_STATES = ("starting", "idle", "busy", "stopping", "killing")


def outcome_of(event: Any) -> str | None:
    """The outcome label of an asyncz event: one of the pool's counters' names (``completed``,
    ``failed``, ``timed_out``, ...), ``skipped`` (``max_instances`` runs in progress) or
    ``unreachable`` (the Dask cluster); ``None`` for other events."""
    code = getattr(event, "code", None)
    if code == TASK_EXECUTED:
        return "completed"
    if code == TASK_MISSED:
        return "missed"
    if code == TASK_MAX_INSTANCES:
        return "skipped"
    if code == TASK_ERROR:
        error = getattr(event, "exception", None)
        return next((name for cls, name in _ERRORS if isinstance(error, cls)), "failed")
    return None


class _Histogram:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        total, out = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class CorralCollector(Collector):
    """A Prometheus collector for one corral scheduler.

    Args:
        scheduler: A :class:`~corral.Scheduler`, or a ``SchedulerConfig`` (Ravyn's too), whose
            scheduler is read at each scrape.
        lag_interval: Seconds between two heartbeats on the scheduler's event loop, which
            measure its lag.

    It counts outcomes and times runs from the moment it first sees the scheduler running: when
    it is made, at a scrape, or at :meth:`attach` (call it right after ``start()`` to count
    from the first run). The pool's own counters (``corral_pool_jobs_total``) count every job
    either way.
    """

    def __init__(self, scheduler: Scheduler | SchedulerConfig, *, lag_interval: float = 0.1):
        self.source = scheduler
        self.lag_interval = lag_interval
        self._lock = threading.Lock()
        self._attached: Any = None  # the asyncz scheduler it listens to
        self._runs: Counter[tuple[str, str]] = Counter()
        self._durations: dict[str, _Histogram] = {}
        self._waits: dict[str, _Histogram] = {}
        self._lags: deque[tuple[float, float]] = deque()
        self.attach()

    def scheduler(self) -> Scheduler | None:
        source = self.source
        return source.scheduler if isinstance(source, SchedulerConfig) else source

    def attach(self) -> bool:
        """Listen to the scheduler's events and runs, if it runs (again: after a restart);
        ``True`` if it is listened to."""
        scheduler = self.scheduler()
        asyncz = None if scheduler is None else scheduler.asyncz
        if asyncz is None:
            return False
        with self._lock:
            if self._attached is asyncz:
                return True
            self._attached = asyncz
        asyncz.add_listener(
            self._on_event, TASK_EXECUTED | TASK_ERROR | TASK_MISSED | TASK_MAX_INSTANCES
        )
        for executor in asyncz.executors.values():
            observers = getattr(executor, "run_observers", None)
            if isinstance(observers, list):
                observers.append(self._on_run)
        loop = getattr(asyncz, "event_loop", None)
        if isinstance(loop, asyncio.AbstractEventLoop) and not loop.is_closed():
            loop.call_soon_threadsafe(self._beat, asyncz, loop, None)
        return True

    # -- inputs ---------------------------------------------------------------------------------

    def _on_event(self, event: Any) -> None:
        outcome = outcome_of(event)
        if outcome is not None:
            with self._lock:
                self._runs[str(event.task_id), outcome] += 1

    def _on_run(self, task_id: str, future: Any, ran_for: float | None) -> None:
        wait = getattr(future, "queue_wait", None)
        with self._lock:
            if wait is not None:
                self._waits.setdefault(task_id, _Histogram(WAIT_BUCKETS)).observe(wait)
            if ran_for is not None:
                self._durations.setdefault(task_id, _Histogram(DURATION_BUCKETS)).observe(ran_for)

    def _beat(self, asyncz: Any, loop: asyncio.AbstractEventLoop, due: float | None) -> None:
        now = loop.time()
        if due is not None:
            with self._lock:
                self._lags.append((time.monotonic(), max(0.0, now - due)))
                while len(self._lags) > 1 and self._lags[0][0] < time.monotonic() - _LAG_WINDOW:
                    self._lags.popleft()
        scheduler = self.scheduler()
        if self._attached is asyncz and scheduler is not None and scheduler.asyncz is asyncz:
            loop.call_later(self.lag_interval, self._beat, asyncz, loop, now + self.lag_interval)

    # -- output ---------------------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        self.attach()
        scheduler = self.scheduler()
        return [family for family in self._families(scheduler) if family.samples]

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def _families(self, scheduler: Scheduler | None) -> Iterator[Metric]:
        yield from self._run_families()
        stats = None if scheduler is None else scheduler.statistics()
        workers = GaugeMetricFamily("corral_workers", "Worker processes by state", labels=["state"])
        rss = GaugeMetricFamily(
            "corral_worker_rss_bytes", "Resident memory of each worker process", labels=["pid"]
        )
        jobs = _counter("corral_pool_jobs", "Jobs of the pool by outcome", ["outcome"])
        submitted = _counter("corral_pool_jobs_submitted", "Jobs submitted to the pool")
        waited = _counter("corral_pool_jobs_waited", "Jobs that waited over 1 s for a worker")
        queued = GaugeMetricFamily("corral_pool_jobs_queued", "Jobs waiting for a worker")
        running = GaugeMetricFamily("corral_pool_jobs_running", "Jobs running in a worker")
        restarts = _counter("corral_worker_restarts", "Workers started to replace another")
        failures = _counter("corral_worker_start_failures", "Worker processes that failed to start")
        recycled = _counter("corral_workers_recycled", "Workers replaced after max_jobs_per_worker")
        if stats is not None:
            states = Counter[str](w.state for w in stats.workers)
            for state in _STATES:
                workers.add_metric([state], states[state])
            for w in stats.workers:
                if w.rss is not None:
                    rss.add_metric([str(w.pid)], w.rss)
            for outcome in _OUTCOMES:
                jobs.add_metric([outcome], getattr(stats, outcome))
            submitted.add_metric([], stats.submitted)
            waited.add_metric([], stats.waited)
            queued.add_metric([], stats.queued)
            running.add_metric([], stats.running)
            restarts.add_metric([], stats.restarts)
            failures.add_metric([], stats.start_failures)
            recycled.add_metric([], stats.recycled)
        yield from (workers, rss, jobs, submitted, waited, queued, running)
        yield from (restarts, failures, recycled)
        yield from self._lag_families(scheduler is not None and scheduler.running)
        yield from _ledger_families(scheduler)
        yield from _cluster_families(scheduler)

    def _run_families(self) -> Iterator[Metric]:
        runs = _counter("corral_runs", "Runs of each task by outcome", ["task", "outcome"])
        durations = HistogramMetricFamily(
            "corral_run_duration_seconds",
            "Seconds each run ran in a worker, from its start to its outcome",
            labels=["task"],
        )
        waits = HistogramMetricFamily(
            "corral_run_queue_wait_seconds",
            "Seconds each run waited for a worker, from its submission to its start",
            labels=["task"],
        )
        with self._lock:
            for (task, outcome), count in sorted(self._runs.items()):
                runs.add_metric([task, outcome], count)
            for family, histograms in ((durations, self._durations), (waits, self._waits)):
                for task, histogram in sorted(histograms.items()):
                    family.add_metric([task], histogram.buckets(), histogram.sum)
        yield from (runs, durations, waits)

    def _lag_families(self, running: bool) -> Iterator[Metric]:
        last = GaugeMetricFamily(
            "corral_event_loop_lag_seconds", "How late the scheduler's event loop ran a heartbeat"
        )
        worst = GaugeMetricFamily(
            "corral_event_loop_lag_max_seconds",
            f"The largest event loop lag over the last {_LAG_WINDOW:g} seconds",
        )
        with self._lock:
            lags = [lag for _, lag in self._lags]
        if running and lags:
            last.add_metric([], lags[-1])
            worst.add_metric([], max(lags))
        yield from (last, worst)


def _counter(name: str, documentation: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, labels=list(labels))


def _ledger_families(scheduler: Scheduler | None) -> Iterator[Metric]:
    stats = None if scheduler is None else scheduler.ledger_statistics()
    available = GaugeMetricFamily("corral_ledger_available", "1 if the database answers")
    claims = _counter("corral_ledger_claims", "Fires claimed in the ledger by result", ["result"])
    lost = _counter("corral_ledger_lost_runs", "Runs of lost replicas this replica reported")
    unrecorded = GaugeMetricFamily(
        "corral_ledger_unrecorded_outcomes", "Outcomes waiting for the database to be recorded"
    )
    queries = _counter("corral_ledger_queries", "Database calls of the ledger")
    if stats is not None:
        available.add_metric([], 1.0 if stats.available else 0.0)
        claims.add_metric(["won"], stats.claims_won)
        claims.add_metric(["taken"], stats.claims_taken)
        claims.add_metric(["skipped"], stats.claims_skipped)
        claims.add_metric(["failed"], stats.claims_failed)
        lost.add_metric([], stats.lost_reported)
        unrecorded.add_metric([], stats.unrecorded_outcomes)
        queries.add_metric([], stats.queries)
    yield from (available, claims, lost, unrecorded, queries)


def _cluster_families(scheduler: Scheduler | None) -> Iterator[Metric]:
    stats = None if scheduler is None else scheduler.cluster_statistics()
    connected = GaugeMetricFamily("corral_dask_connected", "1 if the Dask scheduler is reachable")
    workers = GaugeMetricFamily("corral_dask_workers", "Workers of the Dask cluster")
    runs = _counter("corral_dask_runs", "Runs sent to the Dask cluster by outcome", ["outcome"])
    running = GaugeMetricFamily("corral_dask_runs_running", "Runs running on the Dask cluster")
    waiting = GaugeMetricFamily("corral_dask_runs_waiting", "Runs sent that have not started")
    memory = GaugeMetricFamily(
        "corral_dask_worker_memory_bytes", "Memory of each Dask worker process", labels=["worker"]
    )
    if stats is not None:
        connected.add_metric([], 1.0 if stats.connected else 0.0)
        workers.add_metric([], len(stats.workers))
        for outcome in ("completed", "failed", "timed_out", "crashed", "cancelled"):
            runs.add_metric([outcome], getattr(stats, outcome))
        runs.add_metric(["unreachable"], stats.unavailable)
        running.add_metric([], stats.running)
        waiting.add_metric([], stats.waiting)
        for w in stats.workers:
            if w.memory is not None:
                memory.add_metric([w.address], w.memory)
    yield from (connected, workers, runs, running, waiting, memory)


class MetricsServer:
    """The HTTP endpoint :func:`serve` started: ``/metrics`` on a thread of its own."""

    def __init__(
        self, collector: CorralCollector, registry: CollectorRegistry, host: str, port: int
    ) -> None:
        self.collector = collector
        self.registry = registry
        self.host = host
        self._server, self._thread = start_http_server(port, host, registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving; returns once the server's thread is over."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def serve(
    scheduler: Scheduler | SchedulerConfig, port: int = 0, host: str = "0.0.0.0"
) -> MetricsServer:
    """Serve ``/metrics`` for ``scheduler`` (and this process: CPU, memory, descriptors, GC) on
    ``host:port`` (``port=0``: any free port; :attr:`MetricsServer.port` tells which).

    Raises:
        OSError: the address cannot be bound (in use, or not this host's).
    """
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    collector = CorralCollector(scheduler)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return MetricsServer(collector, registry, host, port)
