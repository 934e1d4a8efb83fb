"""``Coordinator``: the ledger's own thread, so that no database call ever runs on the app's loop.

```
executor (app loop) --claim/finish--> queue --> coordinator thread --> Ledger --> database
           <--- done(result, error) callbacks, on the coordinator thread ---'
every lease/3 s: retry unrecorded outcomes, renew the lease, reap expired replicas (-> on_lost),
                 prune old runs (hourly)
```

When the database cannot be reached, each call's callback gets the error (the caller reports
that fire and does not run it), one WARNING says what is wrong, and the next call or tick tries
again: the scheduler resumes by itself when the database is back.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from corral._ledger._ledger import Ledger
from corral._ledger._records import (
    Claim,
    ClaimRequest,
    ClaimResult,
    LostRun,
    Outcome,
    RunRecord,
    RunStatus,
)
from corral._ledger._schema import safe_url

logger = logging.getLogger("corral.ledger")

Done = Callable[[Any, BaseException | None], None]
_Finish = tuple[Outcome, Callable[[bool | None], None] | None]  # an outcome, and who waits


class ClaimWithdrawn(Exception):
    """A claim the coordinator did not make: it stopped while the claim waited for its time."""


PENDING_LIMIT = 10_000
BATCH = 500  # most queued calls handled together
PRUNE_EVERY = 3600.0
_STOP = object()


@dataclass(frozen=True)
class LedgerStatistics:
    """What this replica's coordinator did so far."""

    database: str
    available: bool
    claims_won: int
    claims_taken: int
    """Fires another replica claimed first: skipped here, silently."""
    claims_skipped: int
    """Fires recorded ``skipped``: ``max_instances`` runs were in progress across replicas."""
    claims_failed: int
    """Fires not run because the database could not be reached."""
    lost_reported: int
    unrecorded_outcomes: int
    """Outcomes waiting for the database to be recorded."""
    queries: int


class _Fanout:
    """One batch's callback: each claim's own ``done`` gets its own results (or the error)."""

    def __init__(self, claims: list[tuple[ClaimRequest, Done]]) -> None:
        self.claims = claims

    def __call__(
        self,
        batches: list[list[ClaimResult] | BaseException] | None,
        error: BaseException | None,
    ) -> None:
        for index, (_, done) in enumerate(self.claims):
            results = None if batches is None else batches[index]
            try:
                if isinstance(results, BaseException):  # refused alone
                    done(None, results)
                else:
                    done(results, error)
            except Exception:
                logger.exception("corral ledger callback %r failed", done)


class Coordinator:
    """Runs every ledger call on one thread; renews this replica's lease in the background.

    Args:
        ledger: The ledger (not joined yet).
        on_lost: Called on the coordinator thread with runs this replica found lost (each lost
            run is found by exactly one replica).
        retention: Finished runs older than this are pruned (hourly).
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        on_lost: Callable[[list[LostRun]], None],
        retention: timedelta = timedelta(days=7),
    ) -> None:
        self.ledger = ledger
        self.on_lost = on_lost
        self.retention = retention
        self.tick_every = ledger.lease / 3
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending: collections.deque[_Finish] = collections.deque()
        self._thread: threading.Thread | None = None
        self._available = True
        self._counts = collections.Counter[str]()
        self._last_prune = 0.0
        self._joined = False
        self._left: list[RunRecord] = []  # runs left in progress, as the thread left
        self.stopped = False
        """``stop`` was called: no outcome is taken any more."""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Join the ledger (blocking: call it off the event loop) and start the thread.

        A database that cannot be reached is a WARNING, not an error: the thread joins when
        it is back, and until then each fire is reported with the error and not run.
        """
        try:
            self.ledger.join()
            self._joined = True
        except (SQLAlchemyError, OSError) as exc:
            self._unavailable(exc)
        self._thread = threading.Thread(target=self._main, name="corral-ledger", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> list[RunRecord]:
        """Record what is queued, leave the ledger and close it; returns runs left in progress
        (recorded ``cancelled``). Blocking: call it off the event loop.

        The coordinator's thread does it, after the calls queued before. Past ``timeout`` (a
        database that does not answer) this returns without it: other replicas report this
        replica's unfinished runs lost once its lease expires."""
        stopped, self.stopped = self.stopped, True
        thread, self._thread = self._thread, None
        if thread is None:  # never started, or stopped already (its thread closes the ledger)
            if not stopped:
                self.ledger.close()
            return []
        self._queue.put(_STOP)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning(
                "corral could not leave the ledger in %s within %s s: the database does not "
                "answer (other replicas will report this replica's unfinished runs lost when "
                "its lease expires)",
                safe_url(self.ledger.url),
                timeout,
            )
            return []
        return self._left

    def _leave(self) -> None:
        """The thread's last step: the outcomes queued as it stopped and those not recorded
        yet, then deregister."""
        left_over = [item for item in self._more() if item is not _STOP and item[0] == "finish"]
        try:
            if self._joined:
                self._finish([(outcome, done) for _, outcome, done in left_over])
                self._left = self.ledger.leave()
        except Exception as exc:
            logger.warning(
                "corral could not deregister from %s at shutdown: %s (other replicas will "
                "report this replica's unfinished runs lost when its lease expires)",
                safe_url(self.ledger.url),
                _one_line(exc),
            )
        finally:
            self.ledger.close()

    # -- calls ----------------------------------------------------------------------------------

    def claim(
        self,
        task: str,
        scheduled: Sequence[datetime],
        max_instances: int,
        done: Callable[[list[ClaimResult] | None, BaseException | None], None],
        *,
        attempt: int = 0,
        delay: float = 0.0,
    ) -> None:
        """Claim fires on the thread, ``delay`` seconds from now; ``done(results, error)`` is
        called there. A claim still waiting for its time when the coordinator stops is not made
        (``ClaimWithdrawn``): the fires are left to the replicas that go on."""
        item = ("claim", ClaimRequest(task, list(scheduled), max_instances, attempt), done)
        if delay > 0:
            self._queue.put(("later", (time.monotonic() + delay, item), None))
        else:
            self._queue.put(item)

    def started(self, run_id: int, worker_pid: int | None, started_at: float) -> None:
        """Record where and when a run started (never blocks: queued for the thread)."""
        self._queue.put(("start", (run_id, worker_pid, started_at), None))

    def finish(
        self,
        run_id: int,
        status: RunStatus,
        *,
        error: str | None = None,
        worker_pid: int | None = None,
        started_at: float | None = None,
        recorded: Callable[[bool | None], None] | None = None,
    ) -> None:
        """Record a run's outcome (kept and retried while the database is away).

        ``recorded(True)`` is called on the thread once it is recorded; ``recorded(False)`` if
        the run was no longer in progress (another replica had reported it lost);
        ``recorded(None)`` if it never will be (the coordinator had stopped, or gave the outcome
        up: ``PENDING_LIMIT``). Not called if the coordinator stops while the database is away.
        """
        outcome = Outcome(run_id, status, error, worker_pid, started_at, time.time())
        if self.stopped:
            if recorded is not None:
                recorded(None)
            return
        self._queue.put(("finish", outcome, recorded))

    def statistics(self) -> LedgerStatistics:
        counts = self._counts
        return LedgerStatistics(
            database=safe_url(self.ledger.url),
            available=self._available,
            claims_won=counts["won"],
            claims_taken=counts["taken"],
            claims_skipped=counts["full"],
            claims_failed=counts["failed"],
            lost_reported=counts["lost"],
            unrecorded_outcomes=len(self._pending),
            queries=self.ledger.queries,
        )

    # -- the thread -----------------------------------------------------------------------------

    def _main(self) -> None:
        next_tick = time.monotonic() + self.tick_every
        later: list[tuple[float, int, Any]] = []  # claims to make at a time: (when, order, item)
        order = itertools.count()
        while True:
            wake = min(next_tick, later[0][0]) if later else next_tick
            try:
                first = self._queue.get(timeout=max(0.0, wake - time.monotonic()))
            except queue.Empty:
                first = None
            items = [] if first is None else [first, *self._more()]
            stop = _STOP in items
            now = []
            for item in items:
                if item is _STOP:
                    continue
                if item[0] == "later":
                    at, claim = item[1]
                    heapq.heappush(later, (at, next(order), claim))
                else:
                    now.append(item)
            while later and later[0][0] <= time.monotonic():
                now.append(heapq.heappop(later)[2])
            self._handle(now)
            if stop:
                for _, _, (_, request, done) in later:
                    error = ClaimWithdrawn(
                        f"task {request.task!r}: the scheduler stopped before it claimed "
                        f"{len(request.scheduled)} fire(s); a replica still running may run them"
                    )
                    self._call_back(done, None, error)
                self._leave()
                return
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + self.tick_every

    def _more(self) -> list[Any]:
        """What else is queued now (up to a bound): handled together, in few transactions."""
        more: list[Any] = []
        with contextlib.suppress(queue.Empty):
            while len(more) < BATCH:
                more.append(self._queue.get_nowait())
        return more

    def _handle(self, items: list[Any]) -> None:
        """Outcomes first (they release instances the claims count), then starts, then claims:
        a run's claim is always handled in an earlier batch than its start and outcome."""
        outcomes = [(outcome, done) for kind, outcome, done in items if kind == "finish"]
        if outcomes:
            self._run(self._finish, (outcomes,), None)
        for kind, args, _ in items:
            if kind == "start":
                self._run(self.ledger.start, args, None)
        claims = [(request, done) for kind, request, done in items if kind == "claim"]
        if claims:
            self._run(self._claim, ([request for request, _ in claims],), _Fanout(claims))

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], done: Done | None) -> None:
        try:
            value = fn(*args)
        except Exception as exc:
            if away(exc):
                self._unavailable(exc)
            else:  # a bug or a value refused: that call's error, never the thread's
                logger.exception("corral ledger call %s failed", getattr(fn, "__name__", fn))
            if done is not None:
                self._call_back(done, None, exc)
            return
        self._reachable()
        if done is not None:
            self._call_back(done, value, None)

    @staticmethod
    def _call_back(done: Done, value: Any, error: BaseException | None) -> None:
        try:
            done(value, error)
        except Exception:
            logger.exception("corral ledger callback %r failed", done)

    def _claim(self, requests: list[ClaimRequest]) -> list[list[ClaimResult] | BaseException]:
        """Claim ``requests`` in one transaction; if the database refuses a value (not a
        connection error), one at a time, so that only the claim refused fails."""
        batches: list[list[ClaimResult] | BaseException]
        try:
            batches = list(self.ledger.claim_many(requests))
        except Exception as exc:
            if away(exc) or len(requests) == 1:
                self._counts["failed"] += sum(len(request.scheduled) for request in requests)
                raise
            batches = [self._claim_alone(request) for request in requests]
        for request, results in zip(requests, batches, strict=True):
            if isinstance(results, BaseException):
                continue
            for result in results:
                self._counts[result.claim.value] += 1
                if result.claim is Claim.TAKEN:
                    logger.debug(
                        "Fire %s of task %r was claimed by another replica; skipped here",
                        result.scheduled,
                        request.task,
                    )
        return batches

    def _claim_alone(self, request: ClaimRequest) -> list[ClaimResult] | BaseException:
        try:
            return self.ledger.claim_many([request])[0]
        except Exception as exc:
            self._counts["failed"] += len(request.scheduled)
            if away(exc):
                self._unavailable(exc)
            else:
                logger.error(
                    "corral: the database refused the claim of task %r: %s",
                    request.task,
                    _one_line(exc),
                )
            return exc

    def _finish(self, outcomes: list[_Finish]) -> None:
        """Record ``outcomes`` after those still waiting for the database (answered in that
        order). While the database does not answer, all wait for the next try; a value it
        refuses costs only its own outcome's details (``_record_each``)."""
        batch = [*self._pending, *outcomes]
        self._pending.clear()
        if not batch:
            return
        try:
            self._record(batch)
        except Exception as exc:
            if not away(exc):
                self._record_each(batch)
                return
            self._pending.extend(batch)
            while len(self._pending) > PENDING_LIMIT:
                dropped, done = self._pending.popleft()
                logger.error("corral dropped the unrecorded outcome of run %s", dropped.run_id)
                if done is not None:
                    done(None)
            raise

    def _record_each(self, batch: list[_Finish]) -> None:
        """Record one outcome at a time; one the database refuses is recorded with its status
        alone, and if that is refused too, given up (answered ``None``)."""
        for index, (outcome, done) in enumerate(batch):
            bare = dataclasses.replace(outcome, error=None, worker_pid=None, started_at=None)
            for attempt in (outcome, bare):
                try:
                    self._record([(attempt, done)])
                    break
                except Exception as exc:
                    if away(exc):
                        self._pending.extend(batch[index:])
                        raise
                    logger.error(
                        "corral: the database refused the outcome of run %s%s: %s",
                        outcome.run_id,
                        "" if attempt is outcome else " (with its status alone)",
                        _one_line(exc),
                    )
            else:
                if done is not None:
                    done(None)

    def _record(self, outcomes: list[_Finish]) -> None:
        recorded = self.ledger.finish_many([outcome for outcome, _ in outcomes])
        for (outcome, done), was_recorded in zip(outcomes, recorded, strict=True):
            if not was_recorded:
                logger.warning(
                    "Run %s finished (%s) after it had been reported lost: this replica's lease "
                    "expired while it ran (was the process stopped, or the database away for "
                    "longer than the lease?)",
                    outcome.run_id,
                    outcome.status,
                )
            if done is not None:
                try:
                    done(was_recorded)
                except Exception:
                    logger.exception("corral ledger callback %r failed", done)

    def _tick(self) -> None:
        self._run(self._maintain, (), None)

    def _maintain(self) -> None:
        if not self._joined:
            self.ledger.join()
            self._joined = True
        if not self.ledger.renew():
            logger.warning(
                "This replica's lease in %s had expired (the process was stopped or cut off "
                "for longer than %.0f s); other replicas reported its runs in progress lost",
                safe_url(self.ledger.url),
                self.ledger.lease,
            )
        lost = self.ledger.reap()
        if lost:
            self._counts["lost"] += len(lost)
            self.on_lost(lost)
        self._finish([])  # (after the lease: an outcome that fails never holds it up)
        now = time.monotonic()
        if now - self._last_prune >= PRUNE_EVERY:
            self._last_prune = now
            pruned = self.ledger.prune(self.retention)
            if pruned:
                logger.debug(
                    "Pruned %d run(s) older than %s from the ledger", pruned, self.retention
                )

    def _unavailable(self, exc: BaseException) -> None:
        if self._available:
            self._available = False
            logger.warning(
                "corral cannot reach its database %s: %s. Due runs are not executed while it "
                "is away (no replica could tell whether another ran them); each is reported "
                "with this error. Retrying every %.1f s.",
                safe_url(self.ledger.url),
                _one_line(exc),
                self.tick_every,
            )

    def _reachable(self) -> None:
        if not self._available:
            self._available = True
            logger.info("corral reaches its database %s again", safe_url(self.ledger.url))


def away(exc: BaseException) -> bool:
    """Whether ``exc`` says that the database cannot be reached now (try again later), rather
    than that it refused a value."""
    if isinstance(
        exc, OSError | OperationalError | InterfaceError | DisconnectionError | PoolTimeoutError
    ):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
