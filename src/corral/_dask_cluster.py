"""Runs on a Dask cluster, each reported exactly once: what ``DaskExecutor`` sends runs to.

```
submit (any thread)  -> the link's thread and loop (corral/_dask_link.py: the client, kept
                        connected; the app's loop never waits on Dask)
  -> connected? (the first connection: wait for it; away: ClusterUnavailableError at once)
  -> Client.submit(corral._dask_worker.run, reference, args, kwargs, meta, key, retries=0)
       on a Dask worker: "start" event; record the start under the key, refuse a second start
  <- "start" event (the app's topic): where, in which pid; the timeout is armed from here
  <- the outcome: value | exception + remote traceback | refused (a second start)
     KilledWorker: WorkerDiedError if its start was recorded, else sent again (it never ran)
     timeout: cancel, Client.restart_workers([its worker]) -> JobTimeoutError once restarted
     connection lost: ClusterUnavailableError (its outcome is unknown)
```

Log records and output lines of runs arrive as events on the same topic and are handled as
those of corral's own workers are.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import pickle
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distributed.scheduler import KilledWorker

from corral import _dask_worker
from corral._dask_lease import PublishedLease
from corral._dask_link import CONNECT_TIMEOUT, ClusterLink, reason
from corral._dask_stats import ClusterStatistics, ClusterWorker
from corral._exceptions import (
    ClusterUnavailableError,
    JobCancelledError,
    JobTimeoutError,
    NotImportableError,
    PoolNotRunningError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    WorkerDiedError,
)

logger = logging.getLogger("corral.dask")

RESTART_TIMEOUT = 30.0
"""Seconds a worker restart (a timed-out run's) may take."""
_ATTEMPTS = 3  # sends of a run whose workers died before it started
_names = itertools.count(1)


class DaskFuture(concurrent.futures.Future[Any]):
    """A run's outcome; where it runs once it has started (``worker_address``, ``worker_pid``)."""

    def __init__(self, job_id: int, label: str | None) -> None:
        super().__init__()
        self.job_id = job_id
        self.label = label
        self.worker_address: str | None = None
        self.worker_pid: int | None = None
        self.on_start: Callable[[DaskFuture], None] | None = None


@dataclass(eq=False)
class _Job:
    id: int
    reference: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    timeout: float | None
    label: str | None
    future: DaskFuture
    lease: int | None = None  # the term of the app's lease it may start under
    key: str = ""
    dask: Any = None  # the distributed.Future of the current send
    worker: str | None = None
    started: float | None = None  # time.monotonic() when its start event arrived
    timer: asyncio.TimerHandle | None = None
    stopping: BaseException | None = None  # the outcome a stop (timeout, shutdown) reports
    stopped: asyncio.Event = field(default_factory=asyncio.Event)


class DaskCluster:
    """Sends runs to a Dask cluster and reports each one's outcome exactly once.

    Args:
        address: The Dask scheduler's address; ``None``: start an embedded ``LocalCluster``.
        workers: Worker processes of the embedded cluster (one thread each).
        max_memory: The embedded workers' memory limit, in bytes (the nanny restarts a worker
            past 95% of it); ``None``: no limit.
        max_result_size: Largest pickled result a run may return.
    """

    def __init__(
        self,
        address: str | None,
        *,
        workers: int,
        max_memory: int | None = None,
        max_result_size: int | None = None,
        name: str | None = None,
    ) -> None:
        self.address = address
        self.max_memory = max_memory
        self.max_result_size = max_result_size
        self.name = name or f"corral-dask-{next(_names)}"
        self._token = uuid.uuid4().hex[:12]  # in its keys: no two links' runs share one
        self.topic = f"corral-{self._token}"
        self.link = ClusterLink(
            address,
            workers=workers,
            max_memory=max_memory,
            topic=self.topic,
            on_event=self._on_event,
            name=self.name,
        )
        self.lease = PublishedLease(self.link, self._token)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # the counters and jobs, read by statistics()
        self._jobs: dict[int, _Job] = {}
        self._by_key: dict[str, _Job] = {}
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._pids: dict[str, int] = {}
        self._runs_done: dict[str, int] = {}
        self._started = False
        self._closing = False
        self._killing = False  # kill_running() during a shutdown: stop waiting for runs
        self._closed: concurrent.futures.Future[None] | None = None
        self._restarts: dict[str, asyncio.Task[Any]] = {}
        self._levels = app_log_levels()

    # -- any thread -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the link; connecting goes on in the background."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self.link.start()

    def submit(
        self,
        reference: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        label: str | None = None,
        lease: int | None = None,
    ) -> DaskFuture:
        """Send a run to the cluster; never blocks. Its future ends with its outcome. With
        ``lease`` (a term of :meth:`hold_lease`), its Dask worker starts it only while the lease
        holds for that term; if not, it ends with ``JobCancelledError``."""
        with self._lock:
            if not self._started or self._closing:
                raise PoolNotRunningError(
                    f"the Dask link {self.name!r} is "
                    f"{'shut down' if self._closing else 'not started'}; it takes no runs"
                )
            job_id = next(self._ids)
            future = DaskFuture(job_id, label)
            job = _Job(job_id, reference, args, dict(kwargs or {}), timeout, label, future, lease)
            self._jobs[job_id] = job
            self._counts["submitted"] += 1
        self.link.call_soon(self._launch, job)
        return future

    def hold_lease(self, term: int, seconds: float) -> None:
        """Runs submitted with ``lease=term`` may start for ``seconds`` more; those submitted
        under another term may not start any more (as ``Pool.hold_lease``; any thread)."""
        self.lease.hold(term, seconds)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until connected with workers (all of an embedded cluster's); ``True`` if so."""
        return self._started and self.link.wait_ready(timeout)

    def statistics(self) -> ClusterStatistics:
        """A snapshot of the cluster's workers and of the runs sent to it."""
        now = time.monotonic()
        known = self.link.worker_info()
        with self._lock:
            running: dict[str, list[_Job]] = {}
            for job in self._jobs.values():
                if job.worker is not None:
                    running.setdefault(job.worker, []).append(job)
            workers = tuple(
                ClusterWorker(
                    address=address,
                    pid=self._pids.get(address),
                    nthreads=int(info.get("nthreads", 0)),
                    memory=info.get("metrics", {}).get("memory"),
                    memory_limit=info.get("memory_limit") or None,
                    nanny=bool(info.get("nanny")),
                    running=tuple(str(j.label) for j in running.get(address, [])),
                    running_for=max(
                        (now - j.started for j in running.get(address, []) if j.started),
                        default=None,
                    ),
                    runs_done=self._runs_done.get(address, 0),
                )
                for address, info in sorted(known.items())
            )
            started = sum(len(jobs) for jobs in running.values())
            return ClusterStatistics(
                address=self.link.scheduler_address(),
                embedded=self.address is None,
                connected=self.link.connected,
                workers=workers,
                running=started,
                waiting=len(self._jobs) - started,
                **self._counts,
            )

    def shutdown(self, wait: bool = True, *, timeout: float | None = None) -> None:
        """Stop: runs not started are cancelled at once; started ones get ``timeout`` seconds
        (``None``: as long as they take), then they are stopped and reported cancelled. Closes
        the client and an embedded cluster (its worker processes exit).

        Args:
            wait: Return once it is all over; ``False``: stop running runs now, return at once.
            timeout: Seconds running runs may still take (with ``wait``).
        """
        with self._lock:
            if not self._started:
                return
            self._closing = True
            if self._closed is None:
                self._closed = self.link.run(self._close(timeout if wait else 0.0))
            elif not wait:
                self.link.call_soon(self._kill)
            closed = self._closed
        if wait:
            closed.result()
            self.link.join()

    # -- runs, on the link's loop ---------------------------------------------------------------

    def _launch(self, job: _Job) -> None:
        self.link.spawn(self._run(job))

    async def _run(self, job: _Job) -> None:
        try:
            value = await self._execute(job)
        except _Raised as raised:  # the run's own exception: any BaseException
            self._resolve(job, error=raised.error)
        except Exception as exc:
            self._resolve(job, error=exc)
        else:
            self._resolve(job, value=value)

    async def _execute(self, job: _Job) -> Any:
        for attempt in range(_ATTEMPTS):
            client, why = await self.link.client()
            if job.stopping is not None:
                raise job.stopping
            if client is None:
                raise _unavailable(job, self.link.scheduler_address(), why)
            key = f"corral-{job.label or 'run'}-{self._token}-{job.id}"
            key += f"-{attempt}" if attempt else ""
            meta = {
                "id": job.id,
                "key": key,
                "topic": self.topic,
                "levels": self._levels,
                "max_result_size": self.max_result_size,
                "lease": None if job.lease is None else (self.lease.key, job.lease),
            }
            if job.lease is not None:  # the scheduler has the lease before the run is there
                try:
                    await self.lease.publish(client)
                except Exception as exc:
                    raise _unavailable(job, self.link.scheduler_address(), reason(exc)) from exc
            job.key = key
            with self._lock:
                self._by_key[key] = job
            try:
                future = job.dask = client.submit(
                    _dask_worker.run,
                    job.reference,
                    job.args,
                    job.kwargs,
                    meta,
                    key=key,
                    pure=False,
                    retries=0,
                )
            except Exception as exc:
                with self._lock:
                    self._by_key.pop(key, None)
                raise _not_sent(job, client, self.link.scheduler_address(), exc) from exc
            try:
                tag, payload = await future
            except concurrent.futures.CancelledError:  # by corral, or by a lost connection
                lost = _lost(job, self.link.scheduler_address())
                raise await self._stopped_or(job, lost) from None
            except KilledWorker:
                if job.stopping is not None:
                    raise await self._stopped_or(job, job.stopping) from None
                start = await _recorded_start(client, key)
                if start is None and job.worker is None:
                    continue  # it never started: the worker died with it waiting there
                limit = self.max_memory if self.address is None else None
                raise _died(job, start or {}, limit) from None
            except Exception as exc:
                if job.stopping is not None:
                    raise await self._stopped_or(job, job.stopping) from None
                raise _cluster_error(job, exc) from None
            finally:
                with self._lock:
                    self._by_key.pop(key, None)
                future.release()
            return self._outcome(job, tag, payload)
        raise WorkerDiedError(
            f"run {job.id} ({job.reference}) was not run: the Dask workers it was sent to died "
            f"{_ATTEMPTS} times before it started; check the workers' logs",
            job_id=job.id,
            pid=None,
            exitcode=None,
        )

    async def _stopped_or(self, job: _Job, error: BaseException) -> BaseException:
        """The outcome of a run whose Dask future ended without a result."""
        if job.stopping is None:
            return error
        await job.stopped.wait()
        return job.stopping

    def _outcome(self, job: _Job, tag: str, payload: Any) -> Any:
        if tag == _dask_worker.RETURNED:
            try:
                return pickle.loads(payload)
            except Exception as exc:
                raise SerializationError(
                    f"run {job.id} ({job.reference}): its result could not be unpickled here: "
                    f"{type(exc).__name__}: {exc}; return plain data, or make its classes "
                    f"importable in the app",
                    stage="result",
                ) from exc
        if tag == _dask_worker.RAISED:
            raise _Raised(_remote_exception(job, *payload))
        if tag == _dask_worker.LAPSED:
            raise _lapsed(job, payload)
        raise _refused(job, payload)

    def _resolve(self, job: _Job, *, value: Any = None, error: BaseException | None = None) -> None:
        """Report ``job``'s outcome, once: later calls do nothing."""
        if job.timer is not None:
            job.timer.cancel()
        kind = "completed" if error is None else _KIND_OF_ERROR.get(type(error), "failed")
        with self._lock:
            if self._jobs.pop(job.id, None) is None:
                return
            self._counts[kind] += 1
            if job.worker is not None:
                self._runs_done[job.worker] = self._runs_done.get(job.worker, 0) + 1
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled by its caller
            if error is None:
                job.future.set_result(value)
            else:
                job.future.set_exception(error)

    # -- events from the workers: starts, log records, output -----------------------------------

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        message = event[1]
        op = message.get("op")
        job = self._by_key.get(message.get("key", ""))
        if op == "start":
            if job is not None and job.key == message["key"] and job.worker is None:
                self._on_start(job, message)
        elif op == "log":
            self._on_log(job, message)
        elif op == "output":
            stream = sys.stdout if message.get("stream") == "stdout" else sys.stderr
            stream.write(str(message.get("text", "")))

    def _on_start(self, job: _Job, message: dict[str, Any]) -> None:
        with self._lock:
            job.worker = str(message["worker"])
            job.started = time.monotonic()
            self._pids[job.worker] = int(message["pid"])
        future = job.future
        future.worker_address, future.worker_pid = job.worker, int(message["pid"])
        if future.on_start is not None:
            try:
                future.on_start(future)
            except Exception:
                logger.exception("corral: recording the start of run %d failed", job.id)
        if job.timeout is not None:
            loop = asyncio.get_running_loop()
            job.timer = loop.call_later(job.timeout, self._on_timeout, job, job.key)

    def _on_log(self, job: _Job | None, message: dict[str, Any]) -> None:
        record = logging.makeLogRecord(message.get("record", {}))
        record.corral_job_id = None if job is None else job.id
        record.corral_job_label = None if job is None else job.label
        record.corral_worker_pid = None if job is None else job.future.worker_pid
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)

    # -- stopping runs: timeouts, shutdown ------------------------------------------------------

    def _on_timeout(self, job: _Job, key: str) -> None:
        if job.key != key or job.future.done() or job.dask is None or job.dask.done():
            return  # over, or its result is on its way: a result that races the timeout wins
        assert job.timeout is not None and job.worker is not None
        error = JobTimeoutError(
            f"run {job.id} ({job.reference}) ran past its timeout of {job.timeout}s on Dask "
            f"worker {job.worker}; that worker (pid {job.future.worker_pid}) was restarted by "
            f"its nanny",
            job_id=job.id,
            timeout=job.timeout,
            pid=job.future.worker_pid,
        )
        self.link.spawn(self._stop(job, error, restart=True))

    async def _stop(
        self, job: _Job, error: BaseException, *, restart: bool, release: bool = True
    ) -> None:
        """Stop one run: cancel it, restart the worker running it (``restart``), then let its
        outcome be ``error`` (``release=False``: once the caller sets ``job.stopped``)."""
        if job.stopping is not None:
            return
        job.stopping = error
        try:
            client = self.link.current()
            if client is not None and job.dask is not None:
                with contextlib.suppress(Exception):
                    await client.cancel([job.dask], force=True)
            if restart and client is not None and job.worker is not None:
                await self._restart(client, job.worker)
        finally:
            if release:
                job.stopped.set()

    async def _restart(self, client: Any, worker: str) -> None:
        """Restart ``worker`` through its nanny, once for every run stopped there meanwhile."""
        restarting = self._restarts.get(worker)
        if restarting is None:
            restarting = self.link.spawn(_restart_worker(client, worker))
            self._restarts[worker] = restarting
            restarting.add_done_callback(lambda _: self._restarts.pop(worker, None))
        with contextlib.suppress(Exception):
            await asyncio.shield(restarting)

    async def _close(self, grace: float | None) -> None:
        """Shutdown, on the link's loop (see :meth:`shutdown`)."""
        for job in list(self._jobs.values()):
            if job.worker is None:
                self.link.spawn(self._stop(job, _cancelled(job, started=False), restart=False))
        deadline = None if grace is None else time.monotonic() + grace
        while self._jobs and not self._killing:
            if deadline is not None and time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        left = self._stop_now()
        if self.address is not None:  # their workers are restarted: then they are over
            await self._drained(RESTART_TIMEOUT + CONNECT_TIMEOUT)
        await self.link.close()  # an embedded cluster closes: its workers exit
        for job in left:
            job.stopped.set()
        await self._drained(CONNECT_TIMEOUT)
        for job in list(self._jobs.values()):  # stops that did not end in time
            self._resolve(job, error=job.stopping or _cancelled(job, started=bool(job.worker)))
        self.link.stop()

    def _kill(self) -> None:
        self._killing = True

    def _stop_now(self) -> list[_Job]:
        """Stop every run left: an external cluster's workers running them are restarted; an
        embedded cluster's runs end when it is closed. Returns the runs stopped."""
        left = list(self._jobs.values())
        embedded = self.address is None
        for job in left:
            started = job.worker is not None
            self.link.spawn(
                self._stop(
                    job,
                    _cancelled(job, started=started),
                    restart=started and not embedded,
                    release=not (started and embedded),
                )
            )
        return left

    async def _drained(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


class _Raised(Exception):
    """Carries a run's own exception (a ``SystemExit`` too) out of :meth:`DaskCluster._execute`."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


_COUNTERS = (
    "submitted",
    "completed",
    "failed",
    "timed_out",
    "crashed",
    "unavailable",
    "cancelled",
)
_KIND_OF_ERROR: dict[type[BaseException], str] = {
    JobTimeoutError: "timed_out",
    WorkerDiedError: "crashed",
    ClusterUnavailableError: "unavailable",
    JobCancelledError: "cancelled",
}


def _cancelled(job: _Job, *, started: bool) -> JobCancelledError:
    return JobCancelledError(
        f"run {job.id} ({job.reference}) was cancelled at shutdown "
        f"{'while it ran on Dask worker ' + str(job.worker) if started else 'before it started'}",
        job_id=job.id,
        started=started,
    )


def _lapsed(job: _Job, payload: dict[str, Any]) -> JobCancelledError:
    return JobCancelledError(
        f"run {job.id} ({job.reference}) was not started: the lease its fire was claimed under "
        f"(term {job.lease}) no longer held when Dask worker {payload.get('worker')} came to it "
        f"(the app was stopped, or could not renew its lease, for longer than replica_lease; "
        f"or the clocks of the app's and the worker's machines disagree by more than the "
        f"lease's margin); another replica may have reported it lost",
        job_id=job.id,
        started=False,
    )


def _not_sent(job: _Job, client: Any, address: str, exc: Exception) -> Exception:
    if client.status != "running":
        return _unavailable(job, address, reason(exc))
    return SerializationError(
        f"run {job.id} ({job.reference}) could not be sent to the Dask cluster: "
        f"{reason(exc)}; pass arguments that pickle (plain data, or instances of classes "
        f"importable on the workers)",
        stage="arguments",
    )


def _unavailable(job: _Job, address: str, why: str) -> ClusterUnavailableError:
    return ClusterUnavailableError(
        f"run {job.id} ({job.reference}) was not run: the Dask scheduler at {address} is "
        f"unavailable ({why}); corral reconnects in the background: check that the "
        f"scheduler is up and reachable from this process",
        job_id=job.id,
        address=address,
        started=False,
    )


def _lost(job: _Job, address: str) -> ClusterUnavailableError:
    where = f"it had started on {job.worker}" if job.worker else "no start of it had been reported"
    return ClusterUnavailableError(
        f"run {job.id} ({job.reference}): the connection to the Dask scheduler at {address} "
        f"was lost while the run was in flight ({where}); whether it ran to its end is "
        f"unknown",
        job_id=job.id,
        address=address,
        started=job.worker is not None,
    )


def _died(job: _Job, start: dict[str, Any], memory_limit: int | None) -> WorkerDiedError:
    worker = start.get("worker") or job.worker
    pid = start.get("pid") or job.future.worker_pid
    limit = (
        "" if memory_limit is None else f", or the nanny's memory limit (max_memory={memory_limit})"
    )
    return WorkerDiedError(
        f"Dask worker {worker} (pid {pid}) died while running run {job.id} "
        f"({job.reference}) (a crash or an OOM kill{limit}); the cluster replaces it, and "
        f"the run was not run again",
        job_id=job.id,
        pid=pid,
        exitcode=None,
    )


def _refused(job: _Job, payload: dict[str, Any]) -> WorkerDiedError:
    first = payload.get("first") or {}
    return WorkerDiedError(
        f"Dask worker {first.get('worker')} (pid {first.get('pid')}) stopped while running "
        f"run {job.id} ({job.reference}) (a crash, an OOM kill, or a restart); Dask then "
        f"started it again on {payload.get('worker')}, and corral refused to run it a "
        f"second time. Set distributed.scheduler.allowed-failures=0 on the scheduler to "
        f"have Dask not try",
        job_id=job.id,
        pid=first.get("pid"),
        exitcode=None,
    )


async def _restart_worker(client: Any, worker: str) -> None:
    try:
        result = await client.restart_workers(
            [worker], timeout=RESTART_TIMEOUT, raise_for_error=False
        )
    except Exception as exc:
        logger.warning("corral: restarting Dask worker %s failed: %s", worker, reason(exc))
        return
    status = result.get(worker, "OK") if isinstance(result, dict) else "OK"
    if status == "removed":
        logger.warning(
            "corral: Dask worker %s has no nanny: it was shut down instead of restarted; "
            "start workers with a nanny (the default of 'dask worker')",
            worker,
        )
    elif status != "OK":
        logger.warning("corral: restarting Dask worker %s: %s", worker, status)


async def _recorded_start(client: Any, key: str) -> dict[str, Any] | None:
    """The first start a run recorded on the scheduler, ``None`` if none; ``{}`` when that
    cannot be read (it then counts as started: corral sends a run again only when sure it
    never ran)."""
    try:
        found = await asyncio.wait_for(
            client.get_metadata([key, _dask_worker.START_RECORD], default=None), CONNECT_TIMEOUT
        )
    except Exception:
        return {}
    starts = [s for s in found.values() if isinstance(s, dict)] if isinstance(found, dict) else []
    return min(starts, key=lambda start: float(start.get("at", 0))) if starts else None


def _remote_exception(
    job: _Job, exc_bytes: bytes | None, type_name: str, message: str, text: str
) -> BaseException:
    error: BaseException | None = None
    if exc_bytes is not None:
        try:
            error = pickle.loads(exc_bytes)
        except Exception:  # reported as a RemoteError below
            error = None
    if not isinstance(error, BaseException):
        error = RemoteError(
            f"run {job.id} ({job.reference}) raised {type_name}: {message} (the exception could "
            f"not be sent to the app as itself; its traceback is kept)",
            type_name=type_name,
            traceback=text,
        )
    error.__cause__ = RemoteTraceback(text)
    return error


def _cluster_error(job: _Job, exc: Exception) -> Exception:
    """An error Dask itself reports for a run (its function could not be loaded or called)."""
    import traceback

    text = "".join(traceback.format_exception(exc))
    error: Exception
    if isinstance(exc, ImportError):
        error = NotImportableError(
            f"run {job.id} ({job.reference}): a Dask worker could not load corral's run "
            f"function: {type(exc).__name__}: {exc}; install corral (pip install 'corral[dask]') "
            f"and the tasks' modules in the workers' environment",
        )
    else:
        error = exc
    error.__cause__ = RemoteTraceback(text)
    return error


def app_log_levels() -> tuple[tuple[str, int], ...]:
    """The levels set in this process: the root's (as ``""``) and every logger's own."""
    levels = [("", logging.getLogger().getEffectiveLevel())]
    for name, found in list(logging.root.manager.loggerDict.items()):
        if isinstance(found, logging.Logger) and found.level != logging.NOTSET:
            levels.append((name, found.level))
    return tuple(levels)
