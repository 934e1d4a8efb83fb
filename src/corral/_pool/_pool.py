"""``Pool``: the public face of the supervised worker pool."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import pickle
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, overload

import anyio.to_thread

from corral._clock import lease_clock
from corral._constants import DEFAULT
from corral._exceptions import PoolNotRunningError, SerializationError
from corral._pool import _launch
from corral._pool._gate import NO_LEASE
from corral._pool._messages import job_frame
from corral._pool._refs import reference_of
from corral._pool._settings import PoolSettings
from corral._pool._stats import PoolStatistics
from corral._pool._supervisor import Job, JobFuture, Supervisor

if TYPE_CHECKING:
    from corral._pool._pool_executor import PoolExecutor

T = TypeVar("T")
_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()
_pool_names = itertools.count(1)


class Pool:
    """A supervised pool of worker processes.

    Whatever a job does (block, burn CPU, hang, crash, leak memory) costs that job and its worker,
    never the pool or the caller.

    Args:
        settings: A :class:`PoolSettings`; keyword ``options`` override its fields.
        name: Shown in logs and errors.
        **options: Any :class:`PoolSettings` field, e.g. ``workers=4, timeout=30``.
    """

    def __init__(
        self, settings: PoolSettings | None = None, /, *, name: str | None = None, **options: Any
    ) -> None:
        if settings is None:
            self.settings = PoolSettings(**options)
        elif options:
            merged = {**settings.model_dump(exclude_unset=True), **options}
            self.settings = PoolSettings(**merged)
        else:
            self.settings = settings
        self.name = name or f"corral-pool-{next(_pool_names)}"
        self._supervisor: Supervisor | None = None
        self._lease: tuple[int, float] = (NO_LEASE, 0.0)  # (term, until): ``hold_lease``
        self._ids = itertools.count(1)
        self._references: dict[Callable[..., Any], str] = {}
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers in the background; returns at once. Idempotent."""
        with self._lock:
            if self._supervisor is not None:
                if not self._supervisor.accepting:
                    raise PoolNotRunningError(
                        f"pool {self.name!r} was shut down and cannot start again; make a new pool"
                    )
                return
            context = _launch.context(self.settings.start_method, self.settings.preload)
            self._supervisor = Supervisor(self.settings, context, self.name)
            term, until = self._lease
            self._supervisor.gate.hold(term, until - lease_clock())
            self._supervisor.start()
            _live_pools.add(self)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every worker has started; return whether they all did in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        event = threading.Event()
        while True:
            stats = self.statistics()
            ready = [w for w in stats.workers if w.state in ("idle", "busy")]
            if len(ready) >= self.settings.workers:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            event.wait(0.01)

    def shutdown(self, wait: bool = True, *, timeout: float | None = None) -> None:
        """Stop the pool.

        Jobs still waiting for a worker end with :class:`JobCancelledError` at once.

        Args:
            wait: ``True`` lets running jobs finish, then returns once every worker has exited
                (one still starting is killed as soon as its process is there).
                ``False`` kills running jobs (they end with :class:`JobCancelledError`) and
                returns at once; the workers are reaped in the background within milliseconds.
            timeout: With ``wait=True``, the seconds running jobs may still take; past it they are
                stopped (SIGTERM, ``kill_grace``, SIGKILL) and end with ``JobCancelledError``,
                and so are idle workers slow to exit; a worker start still under way is waited
                for ``kill_grace`` more at most. So ``shutdown`` returns within about
                ``timeout + kill_grace``. A later call's shorter ``timeout`` counts too.
        """
        supervisor = self._supervisor
        if supervisor is None:
            return
        supervisor.close(wait, timeout)
        if wait:
            supervisor.join(None)

    def may_wait(self) -> bool:
        """Whether the calling thread may block until jobs end: not from the supervisor's own
        thread, nor from a done-callback of a job (it runs while its thread handles a reply)."""
        supervisor = self._supervisor
        return supervisor is None or supervisor.may_wait_here()

    def __enter__(self) -> Pool:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown(wait=True)

    async def __aenter__(self) -> Pool:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self, *, timeout: float | None = None) -> None:
        """``shutdown(wait=True)`` without blocking the event loop."""
        supervisor = self._supervisor
        if supervisor is None:
            return
        supervisor.close(True, timeout)
        await anyio.to_thread.run_sync(supervisor.join, None)

    # -- jobs ---------------------------------------------------------------------------------

    @overload
    def submit(
        self,
        fn: str | Callable[..., NoReturn],  # a reference, or a function that never returns
        /,
        *args: Any,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = DEFAULT,
        start_within: float | None = None,
        label: str | None = None,
        lease: int | None = None,
    ) -> JobFuture[Any]: ...

    @overload
    def submit(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        /,
        *args: Any,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = DEFAULT,
        start_within: float | None = None,
        label: str | None = None,
        lease: int | None = None,
    ) -> JobFuture[T]: ...

    @overload
    def submit(
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = DEFAULT,
        start_within: float | None = None,
        label: str | None = None,
        lease: int | None = None,
    ) -> JobFuture[T]: ...

    def submit(
        self,
        fn: Callable[..., Any] | str,
        /,
        *args: Any,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = DEFAULT,
        start_within: float | None = None,
        label: str | None = None,
        lease: int | None = None,
    ) -> JobFuture[Any]:
        """Queue ``fn(*args, **kwargs)`` for a worker; returns at once.

        The future's value is what ``fn`` returns (for an ``async def`` function: what its
        coroutine returns, run in the worker's own event loop).

        Args:
            fn: A module-level function, or its reference ``"package.module:function"``.
            kwargs: Keyword arguments for ``fn``.
            timeout: Seconds the job may run; default: the pool's ``timeout``; ``None``: no limit.
            start_within: Seconds the job may wait for a worker; past it, it is not run and ends
                with :class:`JobMissedError`.
            label: Shown in logs and statistics (for example the scheduled task's id).
            lease: A term of the pool's lease (:meth:`hold_lease`): the job starts only while
                the lease holds for this term, as its worker checks right before it starts it;
                if not, it is not run and ends with :class:`JobCancelledError`.

        Raises:
            NotImportableError: ``fn`` cannot be imported by reference in a worker.
            SerializationError: an argument cannot be pickled.
            QueueFullError: ``queue_size`` jobs are already waiting.
            PoolNotRunningError: the pool is not started, or is shut down.
        """
        supervisor = self._supervisor
        if supervisor is None:
            raise PoolNotRunningError(
                f"pool {self.name!r} is not started; call pool.start() or use "
                f"'with Pool(...) as pool:'"
            )
        reference = self._reference(fn)
        timeout = self.settings.timeout if timeout is DEFAULT else timeout
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout={timeout!r}: expected a positive number of seconds or None")
        try:
            body = pickle.dumps(
                (reference, args, {} if kwargs is None else dict(kwargs)),
                protocol=pickle.HIGHEST_PROTOCOL,
            )
        except Exception as exc:
            raise SerializationError(
                f"the arguments for {reference} cannot be pickled: {type(exc).__name__}: {exc}; "
                f"pass plain data (numbers, strings, lists, dicts) or picklable objects",
                stage="arguments",
            ) from exc
        job_id = next(self._ids)
        term = NO_LEASE if lease is None else lease
        now = time.monotonic()
        start_by = None if start_within is None else now + start_within
        future: JobFuture[Any] = JobFuture(job_id, label)
        future._supervisor = supervisor
        job = Job(
            id=job_id,
            label=label,
            reference=reference,
            frame=job_frame(job_id, start_by, body, term),
            timeout=timeout,
            start_by=start_by,
            future=future,
            submitted_at=now,
            lease=term,
        )
        supervisor.submit(job)
        return future

    @overload
    async def run(
        self,
        fn: str | Callable[..., NoReturn],  # a reference, or a function that never returns
        /,
        *args: Any,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = DEFAULT,
        start_within: float | None = None,
        label: str | None = None,
    ) -> Any: ...

    @overload
    async def run(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        /,
        *args: Any,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = DEFAULT,
        start_within: float | None = None,
        label: str | None = None,
    ) -> T: ...

    @overload
    async def run(
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = DEFAULT,
        start_within: float | None = None,
        label: str | None = None,
    ) -> T: ...

    async def run(
        self,
        fn: Callable[..., Any] | str,
        /,
        *args: Any,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = DEFAULT,
        start_within: float | None = None,
        label: str | None = None,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` in a worker and return its value (or raise its exception).

        Works under asyncio and under trio (directly or through anyio); the event loop never
        waits on the pool. Cancelling the caller stops the job: taken back if it has not
        started, its worker killed if it has. The arguments are those of :meth:`submit`.
        """
        future = self.submit(
            fn, *args, kwargs=kwargs, timeout=timeout, start_within=start_within, label=label
        )
        if _running_under_trio():
            try:
                return await _trio_outcome(future)
            except BaseException:
                self._abandon(future)  # cancelled (or interrupted): nobody will read the outcome
                raise
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self._abandon(future)
            raise

    def executor(
        self,
        *,
        timeout: float | None = DEFAULT,
        start_within: float | None = None,
        label: str | None = None,
    ) -> PoolExecutor:
        """This pool as a :class:`concurrent.futures.Executor`, for code that expects one.

        ``submit(fn, *args, **kwargs)``, ``map`` and ``loop.run_in_executor(executor, fn,
        *args)`` run their calls as jobs of this pool with these options (those of
        :meth:`submit`). Shutting the executor down waits for its own jobs and refuses new ones;
        the pool keeps running.
        """
        from corral._pool._pool_executor import PoolExecutor

        return PoolExecutor(self, timeout=timeout, start_within=start_within, label=label)

    def _abandon(self, future: JobFuture[Any]) -> None:
        """Stop a job whose outcome nobody will read: cancelled if it waits in the queue, taken
        back if it waits in a worker, its worker killed if it runs."""
        if future.cancel() or future.done():
            return
        supervisor = self._supervisor
        if supervisor is not None and future.running():
            supervisor.kill_job(future.job_id)

    def hold_lease(self, term: int, seconds: float) -> None:
        """Jobs submitted with ``lease=term`` may start for ``seconds`` more (time the machine
        spends suspended counts); those submitted under another term may not start any more.
        For work that must not start once what it was given for may have passed to someone
        else: a fire claimed under a replica's lease, for example. Cheap, and safe from any
        thread."""
        until = lease_clock() + seconds
        self._lease = (term, until)
        supervisor = self._supervisor
        if supervisor is not None:
            supervisor.gate.hold(term, seconds)

    def has_idle_worker(self) -> bool:
        """Whether a worker is free now and nothing waits for one (a hint: it may change at
        once; no lock is taken)."""
        supervisor = self._supervisor
        return supervisor is not None and supervisor.has_idle_worker()

    def statistics(self) -> PoolStatistics:
        """A snapshot of the workers and the counters."""
        if self._supervisor is None:
            raise PoolNotRunningError(f"pool {self.name!r} is not started; call pool.start()")
        return self._supervisor.snapshot()

    def _reference(self, fn: Callable[..., Any] | str) -> str:
        if isinstance(fn, str):
            return reference_of(fn)
        try:
            return self._references[fn]
        except (KeyError, TypeError):
            reference = reference_of(fn)
        with contextlib.suppress(TypeError):  # an unhashable callable is not cached
            self._references[fn] = reference
        return reference


def _running_under_trio() -> bool:
    """Whether the calling task runs under trio (which loads sniffio and sets it)."""
    sniffio = sys.modules.get("sniffio")
    if sniffio is None:
        return False
    try:
        return bool(sniffio.current_async_library() == "trio")
    except sniffio.AsyncLibraryNotFoundError:
        return False


async def _trio_outcome(future: JobFuture[T]) -> T:
    """Wait for ``future`` in trio: the thread that resolves it wakes the waiting task without
    waiting for trio itself."""
    import trio

    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    await done.wait()
    return future.result()


@atexit.register
def _shutdown_live_pools() -> None:
    """At interpreter exit, kill what is left rather than leave workers behind."""
    for pool in list(_live_pools):
        pool.shutdown(wait=False)
        supervisor = pool._supervisor
        if supervisor is not None:
            supervisor.finished.wait(5)
