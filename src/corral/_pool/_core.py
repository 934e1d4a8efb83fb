"""The supervisor's decisions, without I/O: a state machine of jobs, workers and timers.

Events come in as method calls: jobs submitted (``submit``, ``take_in``), what a worker sent
(``received``: decoded messages; ``broken``: bytes that are no message), its exit (``exited``),
starts that finished or failed (``launched``, ``launch_failed``), timers due (``fire``), memory
readings (``measured``), cancels (``kill_job``) and shutdown (``close``). The time is read from
``clock``. What has to be done comes out as actions appended to ``actions`` (``_actions``), which
the shell (``_shell``) carries out in order; ``dispatch`` runs after each round of events. Jobs
are ``_jobs``'s; the workers' lifecycle (starts, deaths, kills, stops) is ``_fleet``'s.

Invariants (checked after every step of ``tests/test_supervisor_simulation.py``):

- a job is in one place: queued, a worker's head, waiting behind one, or over (``done``);
- a job gets one outcome (one ``Resolve``, or none if its caller cancelled it before it started);
- nothing here refers to a job that is over: its caller alone keeps it, as long as it wants;
- after ``dispatch``, no worker idles while a job is queued, and each job that waits behind a
  busy worker while another idles has been recalled;
- a job taken back without its worker's answer (``steal``) is never run by that worker.
"""

from __future__ import annotations

import logging
import signal

from corral._exceptions import CorralError, JobCancelledError, WorkerDiedError
from corral._pool import _messages as msg
from corral._pool._actions import Log, Outcome, Output, Record, Signal
from corral._pool._jobs import Jobs
from corral._pool._link import Message
from corral._pool._state import Job, Worker

_REPLIES = (msg.RETURNED, msg.RAISED, msg.MISSED, msg.LAPSED)


class Core(Jobs):
    """The supervisor's state: jobs (``Jobs``), and the events of the workers' lifecycle, which
    ``fleet`` follows, and of shutdown."""

    @property
    def finished(self) -> bool:
        """Shut down, and every worker gone."""
        return self.fleet.finished

    def received(self, worker: Worker, messages: list[Message]) -> None:
        """What ``worker`` sent, decoded (``_link``)."""
        for message in messages:
            tag = message[0]
            if tag in _REPLIES:
                self._reply(worker, message)
            elif tag == msg.LOG:
                job = worker.job
                job_id, label = (None, None) if job is None else (job.id, job.label)
                self.actions.append(Record(message[1], job_id, label, worker.pid))
            elif tag == msg.OUTPUT:
                job = worker.job
                label = None if job is None else job.label
                self.actions.append(Output(message[1], message[2], label, worker.pid))
            elif tag == msg.RECALLED:
                self.recalled(worker, message[1])
            elif tag == msg.READY:
                self.fleet.ready(worker)
            else:
                self.fleet.init_failed(worker, message[1])

    # -- timers and cancels ---------------------------------------------------------------------

    def fire(self) -> float:
        """Run the timers that are due; return when the next one is (``math.inf``: none)."""
        while (job := self.deadlines.pop_due(self.clock())) is not None:
            job.deadline = None
            self._deadline_passed(job)
        while (callback := self.timers.pop_due(self.clock())) is not None:
            callback()
        return self.next_timer()

    def next_timer(self) -> float:
        return min(self.timers.next_at(), self.deadlines.next_at())

    def _deadline_passed(self, job: Job) -> None:
        """``job``'s start deadline passed: missed if it is queued, recalled if it waits."""
        worker = job.worker
        if worker is None:
            del self.queue[job.id]
            self._resolve(job, self._missed(job))
        elif worker.job is not job and not job.recalling:
            self._recall(worker, [job])

    def kill_job(self, job_id: int) -> None:
        """Stop job ``job_id``: kill the worker running it; take it back if it waits in one."""
        for worker in list(self.workers.values()):
            job = worker.job
            if job is not None and job.id == job_id:
                self._cancel_head(worker)
                return
            job = worker.waiting.get(job_id)
            if job is not None:
                job.cancel_requested = True
                self._recall(worker, [] if job.recalling else [job])
                return

    # -- the workers' lifecycle -----------------------------------------------------------------

    def launched(self, token: int, pid: int) -> Worker | None:
        """Start ``token`` gave process ``pid``: the worker (``None``: not wanted any more; the
        shell kills it)."""
        return self.fleet.launched(token, pid)

    def launch_failed(self, token: int, cause: str) -> None:
        self.fleet.launch_failed(token, cause)

    def measured(self, worker: Worker, rss: int | None) -> None:
        self.fleet.measured(worker, rss)

    def exited(self, worker: Worker, exitcode: int | None) -> None:
        """``worker``'s process has ended (``exitcode``: ``None`` if unknown) and everything it
        sent has been read. Its head gets its outcome (unless it replied first); the jobs that
        waited in it never started and go back to the front of the queue."""
        head, worker.job = worker.job, None
        self.timers.cancel(worker.timeout)
        worker.timeout = None
        unstarted = [self._unwait(worker, job_id) for job_id in list(worker.waiting)]
        outcome = self.fleet.gone(worker, exitcode, head)
        if worker.broken:  # nothing it said after its bad bytes was read: they may have run
            for job in unstarted:
                error = WorkerDiedError(
                    f"job {job.id} ({job.reference}) waited in worker {worker.pid}, which sent a "
                    f"malformed message and was killed; it may have started, so it is not run "
                    f"again",
                    job_id=job.id,
                    pid=worker.pid,
                    exitcode=exitcode,
                )
                self._resolve(job, Outcome.raised(error, "crashed"))
        else:
            self.return_unstarted(unstarted)
        if head is not None and outcome is not None:
            self._resolve(head, outcome)

    def exiting(self, worker: Worker) -> None:
        """``worker``'s process has ended (what it sent is still to be read, then ``exited``):
        it is never idle again, so no submitter takes it (one that took it before has written
        to it, or failed to: see ``unsubmit``)."""
        worker.exit_seen = True
        self.fleet.withdraw(worker)

    def broken(self, worker: Worker, what: str) -> None:
        """``worker`` sent bytes that are not a message: it is killed, and its head fails with
        a ``WorkerDiedError`` that says so."""
        worker.broken = True
        job = worker.job
        doing = "while idle" if job is None else f"while running job {job.id} ({job.reference})"
        text = f"worker {worker.pid} sent a malformed message ({what}) {doing}; it was killed"
        self.actions.append(Log(logging.ERROR, "pool %r: %s", self.name, text))
        error = None
        if job is not None:
            error = WorkerDiedError(text, job_id=job.id, pid=worker.pid, exitcode=None)
        self.fleet.kill(worker, error, graceful=False)

    def write_failed(self, worker: Worker, jobs: tuple[Job, ...]) -> None:
        """A write to ``worker`` failed at once: it has gone, and these jobs (whose frames the
        write held) never reached it. (A submitter's failed write: none; see ``unsubmit``.)"""
        worker.writing = False
        unstarted = []
        for job in jobs:
            if job.done or job.worker is not worker:
                continue
            if worker.job is job:
                worker.job = None
                self.timers.cancel(worker.timeout)
                worker.timeout = None
            else:
                self._unwait(worker, job.id)
            unstarted.append(job)
        self.fleet.kill(worker, None, graceful=False)
        self.return_unstarted(unstarted)

    # -- shutdown -------------------------------------------------------------------------------

    def close(self, wait: bool, deadline: float | None) -> None:
        """Stop: queued jobs are cancelled, jobs waiting in workers taken back and cancelled,
        idle workers stopped. Running jobs finish (``wait``, up to ``deadline``) or are killed."""
        fleet = self.fleet
        if fleet.closing:  # closed again: a shorter wait counts too
            if not wait:
                self.cancel_running(graceful=False)
            elif deadline is not None:
                self.timers.arm(deadline, self._past_deadline)
            return
        fleet.closing = True  # starts under way go on (or time out): their workers are killed
        while self.queue:
            job = self.queue.popitem(last=False)[1]
            error = JobCancelledError(
                f"job {job.id} ({job.reference}) was cancelled at shutdown before it started",
                job_id=job.id,
                started=False,
            )
            self._resolve(job, Outcome.raised(error, "cancelled"))
        for worker in list(self.workers.values()):
            if fleet.take_idle(worker):
                fleet.stop(worker)
            elif worker.state == "starting":
                fleet.kill(worker, None, graceful=False)
            elif worker.waiting:
                fresh = [job for job in worker.waiting.values() if not job.recalling]
                self._recall(worker, fresh)
        if not wait:
            self.cancel_running(graceful=False)
        elif deadline is not None:
            self.timers.arm(deadline, self._past_deadline)

    def _past_deadline(self) -> None:
        """A shutdown's ``timeout`` has passed: running jobs are stopped, and so are idle
        workers slow to exit (SIGTERM, ``kill_grace``, SIGKILL). Starts still under way get
        ``kill_grace`` too; then they are abandoned (their processes killed when they come)."""
        self.cancel_running(graceful=True)
        for worker in list(self.workers.values()):
            if worker.state == "stopping":
                self.fleet.kill(worker, None, graceful=True)
        self.timers.arm(self.clock() + self.settings.kill_grace, self.starts.abandon)

    def cancel_running(self, *, graceful: bool) -> None:
        for worker in list(self.workers.values()):
            job = worker.job
            if job is not None:
                error = JobCancelledError(
                    f"job {job.id} ({job.reference}) was still running at shutdown and was killed",
                    job_id=job.id,
                    started=True,
                )
                self.fleet.kill(worker, error, graceful=graceful)
            elif worker.state == "killing" and not graceful:
                self.actions.append(Signal(worker.pid, signal.SIGKILL))

    def fail_everything(self, error: CorralError) -> list[Worker]:
        """Last resort after a bug in the supervisor: every job fails with ``error``, every
        worker is killed (returned, for the shell to close)."""
        self.fleet.closing = True
        self.starts.abandon()
        workers = list(self.workers.values())
        jobs = list(self.queue.values())
        self.queue.clear()
        for worker in workers:
            self.actions.append(Signal(worker.pid, signal.SIGKILL))
            if worker.job is not None:
                jobs.append(worker.job)
            jobs += [self._unwait(worker, job_id) for job_id in list(worker.waiting)]
            worker.job = None
        self.workers.clear()
        with self.fleet.idle_lock:
            self.idle.clear()
        for job in jobs:
            if not job.done:
                self._resolve(job, Outcome.raised(error, "failed"))
        return workers
