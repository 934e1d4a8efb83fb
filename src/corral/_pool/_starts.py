"""When the core starts workers, and what a start that fails or hangs costs (no I/O here)."""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable

from corral._exceptions import WorkerStartError
from corral._pool._actions import Abandon, Action, Launch, Log
from corral._pool._settings import PoolSettings
from corral._pool._state import Counters
from corral._pool._timers import Timer, Timers

FAILURES_BEFORE_GIVING_UP = 3  # start failures in a row before queued jobs fail
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 10.0
LAUNCH_DEADLINE = 10.0  # seconds a fork may take once the server has started one (<= start_timeout)


class Starts:
    """Starts under way (launches), and the back-off after failures.

    A *launch* is a process start the shell carries out off the supervisor's thread
    (``Launch``); it ends with ``launched`` or ``launch_failed``, or is abandoned when it takes
    too long (the process that starts workers is stuck: ``Abandon`` asks for it to be
    restarted). How long is too long depends on that process: a fresh one first imports the
    worker's modules and the pool's ``preload``, which on a busy machine, or with a heavy app,
    can take many seconds, so its launches may take ``start_timeout``; once it has started a
    worker, a fork that takes longer than ``LAUNCH_DEADLINE`` means it is stuck.

    Every failure, whatever failed (the launch, the worker's imports or initializer, its
    readiness in time), delays the next start: 0.1 s, doubling up to 10 s; after
    ``FAILURES_BEFORE_GIVING_UP`` in a row, ``error`` is set and the core fails the queued jobs
    with it until a worker is ready again.
    """

    def __init__(
        self,
        settings: PoolSettings,
        name: str,
        clock: Callable[[], float],
        timers: Timers[Callable[[], None]],
        actions: list[Action],
        counters: Counters,
        top_up: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.counters = counters
        self.name = name
        self.clock = clock
        self.timers = timers
        self.actions = actions
        self.top_up = top_up  # the core's: called when the back-off is over
        self.launches: dict[int, tuple[float, Timer[Callable[[], None]]]] = {}  # began, deadline
        self._tokens = itertools.count(1)
        self.first_left = settings.workers  # starts that are no restart
        self.failures_in_row = 0
        self.server_proven = False  # the process that starts workers has started one (any pool's)
        self.next_start_at = 0.0
        self._retry: Timer[Callable[[], None]] | None = None
        self.error: WorkerStartError | None = None

    def start(self, missing: int) -> None:
        """Start ``missing`` more workers, as soon as the back-off allows."""
        now = self.clock()
        if missing > 0 and now < self.next_start_at:
            if self._retry is None:
                self._retry = self.timers.arm(self.next_start_at, self._retry_now)
            return
        limit = self.deadline()
        for _ in range(missing):
            token = next(self._tokens)
            timer = self.timers.arm(now + limit, functools.partial(self._timed_out, token, limit))
            self.launches[token] = (now, timer)
            self.actions.append(Launch(token))

    def deadline(self) -> float:
        """How long a launch asked for now may take before it is abandoned."""
        timeout = self.settings.start_timeout
        return min(timeout, LAUNCH_DEADLINE) if self.server_proven else timeout

    def _retry_now(self) -> None:
        self._retry = None
        self.top_up()

    def launched(self, token: int) -> float | None:
        """Start ``token`` gave a process: when it was asked for; ``None``: it is not wanted any
        more (the shell kills it)."""
        launch = self.launches.pop(token, None)
        if launch is None:
            return None
        self.timers.cancel(launch[1])
        self.server_proven = True
        if self.first_left:
            self.first_left -= 1
        else:
            self.counters.restarts += 1
        return launch[0]

    def launch_failed(self, token: int, cause: str, *, count: bool = True) -> bool:
        """Start ``token`` failed: whether that counts (not if it was abandoned already, nor
        when ``count`` is false)."""
        launch = self.launches.pop(token, None)
        if launch is None:
            return False
        self.timers.cancel(launch[1])
        self.server_proven = False  # it may have gone: the next launch may start a fresh one
        if count:
            self.failed(cause)
        return count

    def _timed_out(self, token: int, limit: float) -> None:
        if token not in self.launches:
            return
        self.abandon(restart=True)
        self.failed(
            f"starting a worker took longer than {limit:g}s; the process that starts workers "
            f"was stuck and has been restarted"
        )
        self.top_up()

    def abandon(self, restart: bool = False) -> None:
        """Forget every launch under way (they are stuck, a shutdown's timeout has passed, or
        the supervisor failed)."""
        if self.launches:
            for _, timer in self.launches.values():
                self.timers.cancel(timer)
            self.actions.append(Abandon(tuple(self.launches), restart))
            self.launches.clear()
        if restart:
            self.server_proven = False  # the next launches wait for a fresh one's imports

    def ready(self) -> None:
        """A worker is ready: whatever failed before works again."""
        self.failures_in_row = 0
        self.error = None
        self.next_start_at = 0.0

    def failed(self, cause: str) -> None:
        """Count a failed start and delay the next one (exponential back-off)."""
        self.failures_in_row += 1
        self.counters.start_failures += 1
        delay = min(BACKOFF_FIRST * 2 ** (self.failures_in_row - 1), BACKOFF_MAX)
        self.next_start_at = self.clock() + delay
        self.actions.append(
            Log(
                logging.ERROR,
                "pool %r: %s (failure %d in a row); next start in %.1fs",
                self.name,
                cause.rstrip(),
                self.failures_in_row,
                delay,
            )
        )
        if self.failures_in_row >= FAILURES_BEFORE_GIVING_UP:
            self.error = WorkerStartError(
                f"pool {self.name!r} cannot start workers ({self.failures_in_row} failures in a "
                f"row); last: {cause.rstrip()}; fix the initializer or the worker's imports",
                cause=cause,
            )
