"""Jobs as the supervisor's core sees them: queued, sent, run, recalled, over (no I/O here: see
``_core``)."""

from __future__ import annotations

import contextlib
import pickle
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from corral._exceptions import JobCancelledError, JobMissedError, JobTimeoutError
from corral._pool import _messages as msg
from corral._pool._actions import Action, Drain, Outcome, Resolve, Started, Write
from corral._pool._fleet import Fleet
from corral._pool._link import Message, outcome
from corral._pool._settings import PoolSettings
from corral._pool._state import Counters, Job, Worker
from corral._pool._timers import Timers

BATCH_JOBS = 64  # at most this many jobs wait in one worker
BATCH_BYTES = 1 << 16  # nor more than this many bytes of them
BATCH_FRAME = 1 << 14  # a bigger job only goes to an idle worker
WAIT_WARNING = 1.0  # seconds a job may wait for a worker before it counts as waiting long


class Jobs:
    """Jobs: the queue, dispatch to workers (one to an idle worker, batches to busy ones while
    jobs pile up), heads and their replies, recalls, deadlines, cancels and outcomes. The
    workers themselves are ``fleet``'s."""

    def __init__(
        self,
        settings: PoolSettings,
        name: str,
        clock: Callable[[], float] = time.monotonic,
        idle_lock: contextlib.AbstractContextManager[Any] | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.clock = clock
        self.actions: list[Action] = []
        self.counters = Counters()
        self.timers: Timers[Callable[[], None]] = Timers()  # what to do when (no job kept)
        self.deadlines: Timers[Job] = Timers()  # start deadlines, cancelled when a job ends
        self.queue: OrderedDict[int, Job] = OrderedDict()  # jobs waiting for a worker
        self.waiting = 0  # jobs sent to workers behind their heads, not started
        self.fleet = fleet = Fleet(
            settings, name, clock, self.timers, self.actions, self.counters, idle_lock
        )
        self.workers = fleet.workers  # by pid
        self.idle = fleet.idle  # workers with nothing to do
        self.starts = fleet.starts
        fleet.before_kill = self._recall_waiting

    # -- jobs coming in -------------------------------------------------------------------------

    def submit(self, job: Job) -> Worker | None:
        """Take an idle worker for ``job`` (just submitted), if one is free and nothing is
        queued: ``job`` is its head, and the caller writes the job to it (``None``: the caller
        queues it with ``take_in``).

        The one method called without the state: with ``idle_lock`` held, while another thread
        may run the core. It touches only the idle list, the worker it takes from it (which
        nothing else touches until the caller is done: ``writing``) and the job; the caller then
        arms the head's timers with ``arm`` (or, if its write failed, gives the job back with
        ``unsubmit``)."""
        idle = self.idle
        if not idle or self.queue or len(job.frame) > BATCH_FRAME:
            return None
        worker = idle.pop()
        worker.writing = True
        job.future.set_running_or_notify_cancel()  # new: nobody can have cancelled it yet
        job.running = True
        job.sends += 1
        job.worker = worker
        worker.recalled = False
        worker.job_started = self.clock()
        worker.job = job
        worker.state = "busy"
        return worker

    def arm(self, worker: Worker, job: Job, started: float) -> None:
        """Start the timeout of ``job``, which a submitter made ``worker``'s head at ``started``,
        and the memory watch."""
        if worker.job is job and worker.job_started == started:
            self._watch_head(worker, job, started)

    def unsubmit(self, worker: Worker, job: Job) -> None:
        """The submitter's write of ``job`` to ``worker`` failed at once (idle lock held): the
        worker has gone or is going, and the job never reached it; the submitter queues it
        (``take_in``). The worker stays the submitter's (``writing``: nothing is sent to it)
        until ``write_failed`` kills it."""
        job.worker = worker.job = None

    def count_wait(self) -> None:
        """A submitter gave a job that waited long (``WAIT_WARNING``) to an idle worker."""
        self.counters.waited += 1

    def take_in(self, jobs: Iterable[Job]) -> None:
        """Queue jobs submitted while the state was busy."""
        for job in jobs:
            self.queue[job.id] = job
            if job.start_by is not None:
                job.deadline = self.deadlines.arm(job.start_by, job)

    # -- dispatch -------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Give queued jobs to workers: one to each idle worker, then (while jobs are still
        queued) a batch to each busy one, so that it goes from one job to the next on its own.
        With nothing queued and a worker idle, take back what waits behind busy workers (what
        comes back at once, the shell dispatches again)."""
        error = self.starts.error
        if error is not None and not self.fleet.has_ready_worker():
            while self.queue:
                self._resolve(self.queue.popitem(last=False)[1], Outcome.raised(error))
            return
        while self.idle and self.queue:
            with self.fleet.idle_lock:  # submitters take idle workers too
                if not self.idle:
                    break
                worker = self.idle.pop()
            self._send(worker, 1)
            if worker.state == "idle":  # nothing was sent: every queued job was cancelled
                self.fleet.make_idle(worker)
                break
        if self.queue:
            busy = [w for w in self.workers.values() if w.state == "busy"]
            if busy:
                share = len(self.queue) + sum(len(w.waiting) for w in busy)
                depth = min(BATCH_JOBS, -(-share // len(busy)))
                for worker in busy:
                    if self.queue and not worker.recalled:
                        self._send(worker, depth - len(worker.waiting))
        elif self.idle and self.waiting:
            for worker in list(self.workers.values()):
                if worker.waiting:
                    fresh = [job for job in worker.waiting.values() if not job.recalling]
                    self._recall(worker, fresh)

    def _send(self, worker: Worker, count: int) -> None:
        """Send ``worker`` up to ``count`` queued jobs in one write (first its head, if idle)."""
        if worker.writing:
            return  # a submitter is writing its head to it: no two writers of one socket
        max_jobs = self.settings.max_jobs_per_worker
        if max_jobs is not None:
            assigned = worker.jobs_done + len(worker.waiting) + (worker.job is not None)
            count = min(count, max_jobs - assigned)
        batch: list[Job] = []
        size = worker.waiting_bytes
        queue = self.queue
        while len(batch) < count and queue:
            job = next(iter(queue.values()))
            behind = worker.job is not None or bool(batch)
            if behind and (len(job.frame) > BATCH_FRAME or size + len(job.frame) > BATCH_BYTES):
                break
            del queue[job.id]
            if not job.running and not job.future.set_running_or_notify_cancel():
                self.counters.cancelled += 1  # by its caller, before it was sent anywhere
                self._finish(job)
                continue
            job.running = True
            job.sends += 1
            batch.append(job)
            if behind:
                size += len(job.frame)
        if not batch:
            return
        for job in batch:
            job.worker = worker
            if worker.job is None:
                self._start_head(worker, job)
            else:
                worker.waiting[job.id] = job
                worker.waiting_bytes += len(job.frame)
                self.waiting += 1
        data = batch[0].frame if len(batch) == 1 else b"".join(job.frame for job in batch)
        self.actions.append(Write(worker, data, tuple(batch)))

    # -- heads ----------------------------------------------------------------------------------

    def _start_head(self, worker: Worker, job: Job) -> None:
        """``job`` is the one ``worker`` runs now: its timeout and the memory watch start."""
        worker.recalled = False
        worker.job_started = now = self.clock()
        worker.state = "busy"
        worker.job = job
        wait = now - job.submitted_at
        if wait > WAIT_WARNING:
            self.counters.waited += 1
        self.actions.append(Started(job, worker, wait))
        if job.cancel_requested:
            self._cancel_head(worker)
        else:
            self._watch_head(worker, job, now)

    def _watch_head(self, worker: Worker, job: Job, now: float) -> None:
        if job.timeout is not None:
            # The timer keeps the worker, not the job: a job over before it fires is not kept.
            worker.timeout = self.timers.arm(
                now + job.timeout, lambda: self._timed_out(worker, now)
            )
        self.fleet.watch_memory(now)

    def _next_head(self, worker: Worker) -> None:
        """``worker``'s head is over: the next job waiting in it is its head, or it is idle.

        A worker starts the next job as soon as it has reported one (unless a recall reached it
        first): so even one being killed has started it, and it dies with the worker."""
        worker.job = None
        self.timers.cancel(worker.timeout)
        worker.timeout = None
        if worker.waiting:
            job = self._unwait(worker, next(iter(worker.waiting)))
            if worker.state == "busy":
                self._start_head(worker, job)
            else:  # being killed: no timers, its death is near
                worker.job = job
                worker.job_started = now = self.clock()
                self.actions.append(Started(job, worker, now - job.submitted_at))
        elif worker.state == "busy":
            self.fleet.head_done(worker)

    def _reply(self, worker: Worker, message: Message) -> None:
        """``worker`` reports a job: a reply for a job that is not its head is ignored (that job
        has its outcome already)."""
        job = worker.job
        if job is None or job.id != message[1]:
            return
        tag = message[0]
        if tag == msg.MISSED:
            result = self._missed(job)
        elif tag == msg.LAPSED:
            result = self._lapsed(job)
        else:
            result = outcome(job, message)
        worker.jobs_done += 1
        self._next_head(worker)  # first: a caller woken by this outcome finds the worker free
        self._resolve(job, result)

    def _timed_out(self, worker: Worker, started: float) -> None:
        job = worker.job
        if job is None or worker.job_started != started:
            return  # over, or recalled and sent again: a newer timer counts
        error = JobTimeoutError(
            f"job {job.id} ({job.reference}) ran past its timeout of {job.timeout}s; "
            f"worker {worker.pid} was killed and replaced",
            job_id=job.id,
            timeout=job.timeout,
            pid=worker.pid,
        )
        self.fleet.kill(worker, error, graceful=True)

    def _cancel_head(self, worker: Worker) -> None:
        job = worker.job
        assert job is not None
        error = JobCancelledError(
            f"job {job.id} ({job.reference}) was cancelled while running",
            job_id=job.id,
            started=True,
        )
        self.fleet.kill(worker, error, graceful=True)

    # -- recalls --------------------------------------------------------------------------------

    def _recall(self, worker: Worker, jobs: list[Job]) -> None:
        """Ask ``worker`` to give back these jobs waiting in it, if it has not started them;
        with none, look again whether those already recalled can be taken back."""
        worker.recalled = True
        if jobs:
            for job in jobs:
                job.recalling = True
            worker.recalls.append([(job.id, job.sends) for job in jobs])
            ids = pickle.dumps([job.id for job in jobs])
            self.actions.append(Write(worker, msg.frame(msg.RECALL + ids)))
        self.actions.append(Drain(worker))

    def _recall_waiting(self, worker: Worker) -> None:
        """``worker`` is about to be killed: ask for the jobs waiting in it, so that only its head
        dies with it (if its head ends before the kill, it gives them back)."""
        fresh = [job for job in worker.waiting.values() if not job.recalling]
        if fresh:
            self._recall(worker, fresh)

    def steal(self, worker: Worker) -> None:
        """Take back the recalled jobs waiting in ``worker`` without its answer: the shell has
        written every recall and read what the worker sent, with no reply to its head among it
        (and it is not dead yet: once it is, its exit returns them).

        A worker reports its head before it starts the next job, and reads what came to its
        socket (the recall) before it starts a job that waited in it: so it has not started these
        and never will. Its answer, when it comes, finds them gone. Not waiting for it matters
        when the head holds the GIL: the worker's watch thread, which answers while a job runs,
        cannot run then."""
        if worker.job is None:
            return
        taken = [job for job in worker.waiting.values() if job.recalling]
        for job in taken:
            self._unwait(worker, job.id)
        self.return_unstarted(taken)

    def recalled(self, worker: Worker, job_ids: list[int]) -> None:
        """``worker`` answers its oldest recall: it gave back these jobs, not started.

        The answer is about the jobs as they were when that recall was sent (a worker answers
        its recalls in order): a job taken back meanwhile (``steal``) and sent again, even to
        this worker, is another sending of it (``Job.sends``), which the answer is not about."""
        if not worker.recalls:
            return  # an answer to no recall: nothing to give back
        given = set(job_ids)
        returned = []
        for job_id, sends in worker.recalls.popleft():
            job = worker.waiting.get(job_id)
            if job is None and worker.job is not None and worker.job.id == job_id:
                job = worker.job
            if job is None or job.sends != sends:
                continue  # over, taken back already, or sent again since
            job.recalling = False
            if job_id not in given:
                continue  # it had started
            if job is worker.job:
                self._next_head(worker)  # taken for started, it was not: it waited
            else:
                self._unwait(worker, job_id)
            returned.append(job)
        self.return_unstarted(returned)

    def _unwait(self, worker: Worker, job_id: int) -> Job:
        job = worker.waiting.pop(job_id)
        worker.waiting_bytes -= len(job.frame)
        self.waiting -= 1
        return job

    def return_unstarted(self, jobs: list[Job]) -> None:
        """Jobs a worker never started: back to the front of the queue, unless they are over."""
        now = self.clock()
        requeue = []
        for job in jobs:
            job.worker = None
            job.recalling = False
            if job.cancel_requested or self.fleet.closing:
                when = (
                    "before it started" if job.cancel_requested else "at shutdown before it started"
                )
                error = JobCancelledError(
                    f"job {job.id} ({job.reference}) was cancelled {when}",
                    job_id=job.id,
                    started=False,
                )
                self._resolve(job, Outcome.raised(error, "cancelled"))
            elif job.start_by is not None and now > job.start_by:
                self._resolve(job, self._missed(job))
            else:
                requeue.append(job)
        for job in reversed(requeue):
            self.queue[job.id] = job
            self.queue.move_to_end(job.id, last=False)

    def _missed(self, job: Job) -> Outcome:
        waited = self.clock() - job.submitted_at
        error = JobMissedError(
            f"job {job.id} ({job.reference}) waited {waited:.3f}s for a worker, past its start "
            f"deadline; it was not run; add workers or allow a longer start deadline",
            job_id=job.id,
            waited=waited,
        )
        return Outcome.raised(error, "missed")

    @staticmethod
    def _lapsed(job: Job) -> Outcome:
        error = JobCancelledError(
            f"job {job.id} ({job.reference}) was not started: the lease it was submitted under "
            f"(term {job.lease}) no longer held when its worker came to it (the app was stopped, "
            f"or could not renew the lease, for longer than the lease lasts); its run may be "
            f"another's now",
            job_id=job.id,
            started=False,
        )
        return Outcome.raised(error, "cancelled")

    # -- outcomes -------------------------------------------------------------------------------

    def _finish(self, job: Job) -> None:
        """``job`` is over: nothing here may keep it any more."""
        job.done = True
        job.worker = None
        self.deadlines.cancel(job.deadline)
        job.deadline = None

    def _resolve(self, job: Job, outcome: Outcome) -> None:
        self._finish(job)
        setattr(self.counters, outcome.kind, getattr(self.counters, outcome.kind) + 1)
        if job.running or job.future.set_running_or_notify_cancel():
            self.actions.append(Resolve(job, outcome))
