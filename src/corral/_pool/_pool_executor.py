"""``PoolExecutor``: a :class:`Pool` wherever a ``concurrent.futures.Executor`` is expected."""

from __future__ import annotations

import collections
import functools
import itertools
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_for_futures
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from corral._constants import DEFAULT
from corral._pool._supervisor import JobFuture

if TYPE_CHECKING:
    from corral._pool._pool import Pool

P = ParamSpec("P")
T = TypeVar("T")


class PoolExecutor(Executor):
    """A :class:`concurrent.futures.Executor` whose calls run as jobs of a :class:`Pool`.

    Made by [`Pool.executor`][corral.Pool.executor]. Every call is one job with this executor's
    ``timeout``, ``start_within`` and ``label``, so a call that hangs is killed at its timeout
    and ends with [`JobTimeoutError`][corral.JobTimeoutError], as with `Pool.submit`. The
    functions travel by reference, as with the pool (a `functools.partial` of a module-level
    function is unwrapped into its function and arguments).

    Shutting the executor down (``shutdown()``, or leaving ``with pool.executor() as ex:``)
    refuses new calls and waits for the ones it was given; the pool itself keeps running.

    Args:
        pool: A started pool.
        timeout: Seconds each call may run; default: the pool's ``timeout``; ``None``: no limit.
        start_within: Seconds each call may wait for a worker before it is given up
            ([`JobMissedError`][corral.JobMissedError]).
        label: Shown in logs and statistics for each call.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        timeout: float | None = DEFAULT,
        start_within: float | None = None,
        label: str | None = None,
    ) -> None:
        self.pool = pool
        self.timeout = timeout
        self.start_within = start_within
        self.label = label
        # Never held while calling the pool: done-callbacks (``_forget``) may run on a thread
        # that holds the pool's own lock.
        self._lock = threading.Condition()
        self._futures: set[JobFuture[Any]] = set()
        self._submitting = 0  # calls between the shutdown check and their future's record
        self._shut_down = False

    @overload
    def submit(
        self, fn: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> JobFuture[T]: ...

    @overload
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> JobFuture[T]: ...

    def submit(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> JobFuture[Any]:
        """Run ``fn(*args, **kwargs)`` as a job; returns its future at once.

        For an ``async def`` function the future's value is what its coroutine returns.

        Raises:
            RuntimeError: the executor is shut down.
            NotImportableError: ``fn`` cannot be imported by reference in a worker.
            SerializationError: an argument cannot be pickled.
        """
        function: Callable[..., Any] = fn
        arguments: tuple[Any, ...] = args
        keywords: dict[str, Any] = kwargs
        while isinstance(function, functools.partial):
            arguments = (*function.args, *arguments)
            keywords = {**function.keywords, **keywords}
            function = function.func
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._submitting += 1
        try:
            future: JobFuture[Any] = self.pool.submit(
                function,
                *arguments,
                kwargs=keywords,
                timeout=self.timeout,
                start_within=self.start_within,
                label=self.label,
            )
            with self._lock:
                self._futures.add(future)
        finally:
            with self._lock:
                self._submitting -= 1
                if not self._submitting:
                    self._lock.notify_all()
        future.add_done_callback(self._forget)  # at once, here, if the job is already over
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """``fn`` over the iterables' items, one job per call; results in order.

        ``timeout`` bounds the whole iteration from this call, as with any executor; when it
        passes, iterating raises :class:`TimeoutError` and the calls not yet done are stopped
        (taken back, or their worker killed). Leaving the iteration early stops them too. Each
        call also has the executor's own ``timeout``: a call that hangs ends with
        [`JobTimeoutError`][corral.JobTimeoutError] when its result is reached.

        Args:
            fn: A module-level function.
            iterables: One argument of each call from each.
            timeout: Seconds for the whole iteration; ``None``: no limit.
            chunksize: Accepted for compatibility; every call is its own job.
            buffersize: At most this many calls submitted ahead of the result being read
                (``None``: all at once).
        """
        if buffersize is not None and buffersize < 1:
            raise ValueError(f"buffersize={buffersize!r}: expected a positive integer or None")
        deadline = None if timeout is None else time.monotonic() + timeout
        calls = zip(*iterables, strict=False)
        ahead = calls if buffersize is None else itertools.islice(calls, buffersize)
        futures = collections.deque(self.submit(fn, *call) for call in ahead)
        more = None if buffersize is None else calls
        return self._results(fn, futures, more, deadline)

    def _results(
        self,
        fn: Callable[..., T],
        futures: collections.deque[JobFuture[T]],
        more: Iterator[tuple[Any, ...]] | None,
        deadline: float | None,
    ) -> Iterator[T]:
        try:
            while futures:
                if more is not None:
                    call = next(more, None)
                    if call is not None:
                        futures.append(self.submit(fn, *call))
                future = futures[0]
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                value = future.result(left)
                futures.popleft()
                yield value
        finally:
            for future in futures:  # nobody will read these: stop them
                self.pool._abandon(future)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; with ``wait``, return once every call given so far is done.

        Called from a job's done-callback, it does not wait (the callback runs while its thread
        handles the replies those calls wait for): the calls go on, and end as they would.

        Args:
            wait: Wait for the calls given so far.
            cancel_futures: First stop the calls no worker has started (cancelled in the pool's
                queue, taken back from a worker they wait in; one that starts at this very
                moment is stopped too).
        """
        with self._lock:
            self._shut_down = True
            self._lock.wait_for(lambda: not self._submitting)
            futures = list(self._futures)
        if cancel_futures:
            for future in futures:
                if future.worker_pid is None:  # no worker has started it
                    self.pool._abandon(future)
        if wait and self.pool.may_wait():  # (not from a job's done-callback: see Pool.shutdown)
            wait_for_futures(futures)

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)
