"""The supervisor's core (``corral._pool._core``) under seeded random interleavings.

A simulation stands in for the shell and the worker processes: simulated workers keep the real
worker's contract (jobs in order, one reply each before the next starts, recalls read before a job
that waited starts, the watch thread answering recalls unless the job holds the GIL), and bytes
travel both ways through bounded buffers, read in random pieces (partial frames). Each step is
one event, drawn from a seeded ``random.Random``: a submit, a worker reading, starting, finishing,
crashing, hanging, sending garbage, a read by the parent, an exit, a start that finishes, fails
or sticks, time passing to the next timer, a cancel, a memory reading, the pool's lease renewed or
replaced by a new term (``_gate``), shutdown. After every step
the invariants are checked:

- each job is in one place (queued, a head, waiting behind one) or over, never two;
- each job gets exactly one outcome;
- nothing of the core refers to a job that is over;
- no worker idles while a job is queued, and a job waiting behind a busy worker while another
  idles has been recalled;
- no job runs twice (a job taken back without its worker's answer is never run by it);
- a job submitted under a lease starts only while the lease holds for its term; one whose
  worker found it lapsed ends cancelled (or crashed, if its worker dies before its reply is
  read);
- the counters agree with what happened.

A failing run names its seed; ``pytest tests/test_supervisor_simulation.py --simulation-steps N``
runs longer (and ``--simulation-seed S`` replays one seed exactly).
"""

from __future__ import annotations

import functools
import gc
import pickle
import random
import struct
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from corral import PoolSettings
from corral._pool import _messages as msg
from corral._pool._actions import (
    Abandon,
    Drain,
    Launch,
    Log,
    Measure,
    Outcome,
    Output,
    Record,
    Resolve,
    Signal,
    Started,
    Write,
)
from corral._pool._core import Core
from corral._pool._gate import NO_LEASE
from corral._pool._link import Link
from corral._pool._state import Job, Worker

SEEDS = range(12)
MAX_LIVE = 300  # jobs without an outcome, at most
RX_CAPACITY = 4096  # what a worker's socket holds before the parent's writes wait in its outbox
READ_SIZE = 3000  # the most a worker's read takes at once
BEHAVIOURS = {  # what a job does in its worker -> weight
    "return": 50,
    "raise": 8,
    "crash": 5,
    "hang": 4,  # until killed
    "hold-gil": 6,  # runs long and its worker's watch thread cannot answer recalls
    "ignore-sigterm": 2,  # hangs, and only SIGKILL ends it
    "garbage": 2,  # writes bytes that are not a message
    "log": 4,
    "big": 3,  # a frame over 16 KiB: only ever sent to an idle worker
    "unpicklable": 2,  # its value cannot be unpickled in the parent
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeFuture:
    """What the core needs of a future: to be claimed, unless its caller cancelled it first."""

    def __init__(self) -> None:
        self.state = "pending"  # pending, running, cancelled

    def set_running_or_notify_cancel(self) -> bool:
        assert self.state != "running", "a future claimed twice"
        if self.state == "cancelled":
            return False
        self.state = "running"
        return True

    def cancel(self) -> bool:
        if self.state == "pending":
            self.state = "cancelled"
            return True
        return False


@dataclass
class JobInfo:
    id: int
    behaviour: str
    future: FakeFuture
    ref: weakref.ref[Job]
    outcomes: list[str] = field(default_factory=list)
    runs: int = 0  # times a simulated worker started it
    finished_by_worker: bool = False
    lapsed: bool = False  # its worker found its lease no longer held


class SimWorker:
    """A worker process: its jobs in order, one at a time, one reply each."""

    def __init__(self, sim: Simulation, pid: int, start: str) -> None:
        self.sim = sim
        self.pid = pid
        self.rx = bytearray()  # what the parent wrote, not read yet (its socket's buffer)
        self.tx = bytearray()  # what it wrote, not read by the parent yet
        self.received = bytearray()  # read, not yet a whole frame
        self.jobs: deque[tuple[int, float, int, str]] = deque()  # received, not started
        self.fresh = False  # the jobs it holds came with its last read, made while idle
        self.running: tuple[int, str] | None = None
        self.start = start  # "ok", "init-fails", "never-ready"
        self.ready = False
        self.alive = True
        self.exit_code: int | None = None
        self.stopping = False
        self.exit_reported = False

    # -- its threads ---------------------------------------------------------------------------

    def read(self, everything: bool) -> None:
        """Read what the parent wrote: all of it, or one read's worth (``READ_SIZE`` at most,
        when it waits in ``read()`` while idle), and take in each whole frame."""
        if not self.rx:
            return
        size = len(self.rx) if everything else min(len(self.rx), READ_SIZE)
        if not everything:  # its main thread, idle: it read all there was, or may have left some
            self.fresh = size == len(self.rx)
        data = bytes(self.rx[:size])
        del self.rx[:size]
        for frame in msg.frames(self.received, data):
            tag = frame[:1]
            if tag == msg.JOB:
                _, job_id, start_by, term = msg.JOB_HEAD.unpack_from(frame)
                reference, args, _ = pickle.loads(frame[msg.JOB_HEAD.size :])
                assert reference == "sim:job"
                self.jobs.append((job_id, start_by, term, args[0]))
                self.sim.trace.append(f"worker {self.pid} receives job {job_id}")
            elif tag == msg.RECALL:
                wanted = set(pickle.loads(frame[1:]))
                given = [job[0] for job in self.jobs if job[0] in wanted]
                self.sim.trace.append(f"worker {self.pid} recall {sorted(wanted)}: gives {given}")
                self.jobs = deque(job for job in self.jobs if job[0] not in wanted)
                self.send(msg.RECALLED + pickle.dumps(given))
            elif tag == msg.STOP:
                self.stopping = True

    def send(self, message: bytes) -> None:
        self.tx += msg.frame(message)

    def step(self) -> None:
        """Its main thread moves on by one thing."""
        sim = self.sim
        if not self.ready:
            if self.start == "ok":
                self.ready = True
                self.send(msg.READY)
            elif self.start == "init-fails":
                self.send(msg.INIT_FAILED + b"Traceback: the initializer failed")
                self.die(3)
            return
        if self.running is not None:
            job_id, behaviour = self.running
            if behaviour in ("hang", "ignore-sigterm"):
                return
            self.finish(job_id, behaviour)
            return
        if self.jobs:
            if not self.fresh:
                self.read(everything=True)  # a recall that came meanwhile counts first
            if not self.jobs:
                return
            job_id, start_by, term, behaviour = self.jobs.popleft()
            self.fresh = False
            if sim.clock.now > start_by:  # never for NaN
                self.send(msg.ID_HEAD.pack(msg.MISSED, job_id))
                return
            if term != NO_LEASE and not sim.lease_holds(term):  # as the worker reads its gate
                sim.info[job_id].lapsed = True
                sim.trace.append(f"worker {self.pid} finds job {job_id}'s lease lapsed")
                self.send(msg.ID_HEAD.pack(msg.LAPSED, job_id))
                return
            sim.trace.append(f"worker {self.pid} starts job {job_id}")
            sim.info[job_id].runs += 1
            assert sim.info[job_id].runs == 1, f"job {job_id} run twice"
            self.running = (job_id, behaviour)
            if behaviour == "crash":
                self.die(sim.rng.choice([1, -11, -9]))
            elif behaviour == "garbage":
                self.tx += struct.pack("!i", -7) + b"junk"
            elif behaviour == "log":
                self.send(msg.LOG + pickle.dumps({"name": "sim", "msg": "hi", "levelno": 30}))
                self.send(msg.OUTPUT + pickle.dumps(("stdout", "printed\n")))
            return
        if self.stopping:
            self.die(0)
            return
        if self.rx:
            self.read(everything=False)  # waiting in read() while idle

    def watch(self) -> None:
        """Its watch thread: reads while a job runs, unless the job holds the GIL."""
        if self.running is not None and self.running[1] != "hold-gil":
            self.read(everything=True)

    def finish(self, job_id: int, behaviour: str) -> None:
        self.running = None
        info = self.sim.info[job_id]
        info.finished_by_worker = True
        if behaviour == "raise":
            report = (None, "sim.Error", "it failed", "Traceback: it failed")
            self.send(msg.ID_HEAD.pack(msg.RAISED, job_id) + pickle.dumps(report))
        elif behaviour == "unpicklable":
            self.send(msg.ID_HEAD.pack(msg.RETURNED, job_id) + b"not a pickle")
        else:
            self.send(msg.ID_HEAD.pack(msg.RETURNED, job_id) + pickle.dumps(job_id))

    def signal(self, number: int) -> None:
        if not self.alive:
            return
        if number == 15 and self.running is not None and self.running[1] == "ignore-sigterm":
            return
        self.die(-number)

    def die(self, code: int) -> None:
        if self.alive:
            self.sim.trace.append(f"worker {self.pid} dies ({code}) running {self.running}")
            self.alive = False
            self.exit_code = code
            self.running = None
            self.rx.clear()


class SimChannel:
    """The shell's side of one simulated worker."""

    def __init__(self, sim_worker: SimWorker) -> None:
        self.sim_worker = sim_worker
        self.link = Link(limit=1 << 20)
        self.reading = True

    def write(self, data: bytes) -> bool:
        worker = self.sim_worker
        if self.link.outbox:
            self.link.outbox += data
            return True
        if not worker.alive:
            return False
        room = max(0, RX_CAPACITY - len(worker.rx))
        worker.rx += data[:room]
        self.link.outbox += data[room:]
        return True

    def flush(self) -> None:
        worker = self.sim_worker
        if not worker.alive:
            self.link.outbox.clear()
            return
        room = max(0, RX_CAPACITY - len(worker.rx))
        worker.rx += self.link.outbox[:room]
        del self.link.outbox[:room]


class Simulation:
    """The shell's part, played against simulated workers, with the invariants checked."""

    def __init__(self, seed: int, steps: int) -> None:
        self.seed = seed
        self.steps = steps
        self.rng = rng = random.Random(seed)
        self.clock = Clock()
        self.settings = PoolSettings(
            workers=rng.randint(1, 4),
            kill_grace=rng.choice([0.0, 0.5]),
            max_jobs_per_worker=rng.choice([None, None, 3]),
            max_memory=rng.choice([None, 1 << 30]),
            memory_check_interval=0.3,
            start_timeout=rng.choice([2.0, 20.0]),
            queue_size=10**9,
        )
        self.core = Core(self.settings, "sim", self.clock)
        self.info: dict[int, JobInfo] = {}
        self.live: set[int] = set()  # jobs without an outcome yet
        self.dead_refs: list[JobInfo] = []  # jobs over: their Job must be gone
        self.launches: dict[int, str] = {}  # starts under way: token -> how it will end
        self.abandoned: set[int] = set()
        self.sim_workers: dict[int, SimWorker] = {}
        self.pids = iter(range(100, 10**6))
        self.job_ids = iter(range(1, 10**9))
        self.closing = False
        self.lease = (1, 2.0)  # the pool's lease: (term, holds until), as ``Gate.hold`` sets it
        self.trace: deque[str] = deque(maxlen=40)
        self.submitted = 0

    # -- carrying out the core's actions, as the shell does --------------------------------------

    def execute(self) -> None:
        actions = self.core.actions
        while actions:
            batch = actions.copy()
            actions.clear()
            for action in batch:
                self.do(action)

    def do(self, action: Any) -> None:
        core = self.core
        if isinstance(action, Write):
            channel: SimChannel = action.worker.io
            self.trace.append(
                f"write to {action.worker.pid}: {[j.id for j in action.jobs]} {action.data[4:5]!r}"
            )
            if not channel.write(action.data):
                self.trace.append(f"write to {action.worker.pid} failed")
                core.write_failed(action.worker, action.jobs)
        elif isinstance(action, Resolve):
            info = self.info[action.job.id]
            assert info.id in self.live, f"job {info.id} resolved twice: {action.outcome}"
            self.over(info, action.outcome)
        elif isinstance(action, Signal):
            sim_worker = self.sim_workers.get(action.pid)
            if sim_worker is not None:
                sim_worker.signal(action.signal)
        elif isinstance(action, Drain):
            self.drain(action.worker)
        elif isinstance(action, Launch):
            self.launches[action.token] = self.rng.choice(
                ["ok"] * 8 + ["init-fails", "fails", "sticks", "never-ready"]
            )
        elif isinstance(action, Abandon):
            self.abandoned.update(action.tokens)
        elif isinstance(action, Measure):
            for worker in action.workers:
                core.measured(worker, self.rng.choice([10, 20, 2 << 30]))
        else:
            assert isinstance(action, Started | Output | Record | Log), action

    def over(self, info: JobInfo, outcome: Outcome | str) -> None:
        info.outcomes.append(outcome if isinstance(outcome, str) else outcome.kind)
        if info.outcomes[-1] == "completed":
            assert info.finished_by_worker, f"job {info.id} completed without running"
        if info.lapsed:  # (its worker may die before its reply is read)
            assert info.outcomes[-1] in ("cancelled", "crashed"), f"{info.id} lapsed: {outcome}"
        self.live.discard(info.id)
        self.dead_refs.append(info)

    def drain(self, worker: Worker) -> None:
        channel: SimChannel = worker.io
        if channel.link.outbox or not channel.reading:
            return
        head = worker.job
        while channel.reading and channel.sim_worker.tx:
            self.parent_reads(worker, everything=False)
        if worker.job is head and channel.reading and not channel.link.inbox:
            self.trace.append(f"steal from {worker.pid}: {sorted(worker.waiting)}")
            self.core.steal(worker)

    def parent_reads(self, worker: Worker, everything: bool) -> None:
        channel: SimChannel = worker.io
        tx = channel.sim_worker.tx
        if not tx or not channel.reading:
            return
        size = len(tx) if everything else self.rng.randint(1, len(tx))
        data = bytes(tx[:size])
        del tx[:size]
        messages, error = channel.link.messages(data)
        self.core.received(worker, messages)
        if error is not None:
            channel.reading = False
            self.core.broken(worker, error)

    def dispatch(self) -> None:
        core = self.core
        core.dispatch()
        self.execute()
        for _ in range(3):
            if not (core.idle and core.queue):
                break
            core.dispatch()
            self.execute()

    # -- events ----------------------------------------------------------------------------------

    def submit(self) -> None:
        rng = self.rng
        job_id = next(self.job_ids)
        behaviour = rng.choices(list(BEHAVIOURS), weights=list(BEHAVIOURS.values()))[0]
        now = self.clock.now
        start_by = rng.choice([None, None, now + rng.uniform(0.1, 3)])
        term = rng.choice([NO_LEASE, NO_LEASE, self.lease[0], self.lease[0] - 1])
        padding = b"x" * (20_000 if behaviour == "big" else rng.choice([0, 0, 3000]))
        body = pickle.dumps(("sim:job", (behaviour, padding), {}))
        future = FakeFuture()
        job = Job(
            id=job_id,
            label=None,
            reference="sim:job",
            frame=msg.job_frame(job_id, start_by, body, term),
            timeout=rng.choice([None, 1.0, 5.0]),
            start_by=start_by,
            future=future,
            submitted_at=now,
            lease=term,
        )
        self.info[job_id] = JobInfo(job_id, behaviour, future, weakref.ref(job))
        self.live.add(job_id)
        self.submitted += 1
        self.trace.append(
            f"submit {job_id} {behaviour} timeout={job.timeout} by={start_by} lease={term}"
        )
        worker = self.core.submit(job) if rng.random() < 0.7 else None
        if worker is None:
            self.core.take_in([job])
            return
        channel: SimChannel = worker.io
        started = worker.job_started
        if not channel.write(job.frame):  # as the shell: the job is queued, the worker killed
            self.core.unsubmit(worker, job)
            self.core.take_in([job])
            self.core.write_failed(worker, ())
        else:
            worker.writing = False
            self.core.arm(worker, job, started)
        self.execute()

    def launch_ends(self, token: int) -> None:
        how = self.launches.pop(token)
        self.trace.append(f"launch {token} ends: {how}")
        if how == "fails":
            self.core.launch_failed(token, "OSError: [Errno 24] Too many open files")
            return
        pid = next(self.pids)
        sim_worker = SimWorker(self, pid, how)
        worker = self.core.launched(token, pid)
        if worker is None:  # one that ends while the pool closes is still the pool's to kill
            assert token in self.abandoned, f"launch {token} was not wanted"
            return  # the shell kills what nobody wants
        worker.io = SimChannel(sim_worker)
        self.sim_workers[pid] = sim_worker

    def exit_seen(self, sim_worker: SimWorker) -> None:
        """Its sentinel fired: read what is left, then report the exit."""
        worker = self.core.workers.get(sim_worker.pid)
        sim_worker.exit_reported = True
        del self.sim_workers[sim_worker.pid]
        if worker is None:
            return
        self.core.exiting(worker)
        self.parent_reads(worker, everything=True)
        self.trace.append(f"exit {sim_worker.pid} code={sim_worker.exit_code}")
        self.core.exited(worker, sim_worker.exit_code)

    def time_passes(self) -> None:
        rng = self.rng
        nearest = self.core.next_timer()
        if nearest != float("inf") and rng.random() < 0.6:
            self.clock.now = max(self.clock.now, nearest)
        else:
            self.clock.now += rng.choice([0.001, 0.05, 0.3])
        self.trace.append(f"time {self.clock.now:.3f}")
        self.core.fire()

    def lease_holds(self, term: int) -> bool:
        return term == self.lease[0] and self.clock.now < self.lease[1]

    def lease_changes(self) -> None:
        """The pool's lease is renewed (or not in time), or held in a new term."""
        term, _ = self.lease
        if self.rng.random() < 0.2:
            term += 1
        self.lease = (term, self.clock.now + self.rng.choice([0.0, 0.5, 2.0]))
        self.trace.append(f"lease term {term} holds until {self.lease[1]:.3f}")

    def cancel(self) -> None:
        if not self.live:
            return
        job_id = self.rng.choice(sorted(self.live))
        info = self.info[job_id]
        if self.rng.random() < 0.5 and info.future.cancel():
            self.trace.append(f"future of {job_id} cancelled")
            # The pool learns of it when it would send the job; its outcome is the cancel.
            return
        self.trace.append(f"kill_job {job_id}")
        self.core.kill_job(job_id)

    def step(self) -> None:
        rng = self.rng
        events: list[tuple[int, Callable[[], None]]] = []
        if not self.closing:
            if len(self.live) < MAX_LIVE:  # as a queue_size would
                events.append((6, self.submit))
            events.append((1, self.cancel))
            events.append((1, self.lease_changes))
        for sim_worker in sorted(self.sim_workers.values(), key=lambda w: w.pid):
            worker = self.core.workers.get(sim_worker.pid)
            if sim_worker.alive:
                events.append((4, sim_worker.step))
                events.append((2, sim_worker.watch))
            elif not sim_worker.exit_reported:
                events.append((3, functools.partial(self.exit_seen, sim_worker)))
            if worker is not None and sim_worker.tx:
                events.append((5, functools.partial(self.parent_reads, worker, everything=False)))
            if worker is not None and worker.io.link.outbox:
                events.append((2, worker.io.flush))
        for token, how in sorted(self.launches.items()):
            if how != "sticks":
                events.append((3, functools.partial(self.launch_ends, token)))
        events.append((3, self.time_passes))
        weights, choices = zip(*events, strict=True)
        rng.choices(choices, weights=weights)[0]()
        self.execute()
        self.dispatch()

    def close(self) -> None:
        wait = self.rng.random() < 0.7
        deadline = self.clock.now + self.rng.choice([0.5, 3.0]) if wait else None
        self.trace.append(f"close wait={wait} deadline={deadline}")
        self.closing = True
        self.core.close(wait, deadline)
        self.execute()

    # -- invariants --------------------------------------------------------------------------------

    def check(self) -> None:
        core = self.core
        places: dict[int, int] = {}
        for job_id, job in core.queue.items():
            assert job.id == job_id and not job.done and job.worker is None
            places[job_id] = places.get(job_id, 0) + 1
        waiting = 0
        for pid, worker in core.workers.items():
            assert worker.pid == pid
            for job in ([worker.job] if worker.job is not None else []) + list(
                worker.waiting.values()
            ):
                assert not job.done and job.worker is worker, (job.id, worker.pid)
                places[job.id] = places.get(job.id, 0) + 1
            waiting += len(worker.waiting)
            assert worker.waiting_bytes == sum(len(j.frame) for j in worker.waiting.values())
            assert (worker.state == "idle") == (worker in core.idle), worker
            if worker.state == "idle":
                assert worker.job is None and not worker.waiting
        assert waiting == core.waiting
        assert all(count == 1 for count in places.values()), places
        live_but_cancelled = {
            i for i in self.live if self.info[i].future.state == "cancelled" and i not in places
        }
        assert set(places) | live_but_cancelled == self.live, (
            f"jobs lost: {self.live - set(places) - live_but_cancelled}, "
            f"over but kept: {set(places) - self.live}"
        )
        # No worker idles while a job is queued; what waits behind busy workers is recalled.
        if core.idle:
            assert not core.queue, "a worker idles while jobs are queued"
            for worker in core.workers.values():
                for job in worker.waiting.values():
                    assert job.recalling, f"job {job.id} waits in {worker.pid} though one idles"
        # Exactly one outcome per job; a job over is kept by nothing of the core's.
        for info in self.dead_refs:
            assert len(info.outcomes) == 1, (info.id, info.outcomes)
            assert info.ref() is None, f"job {info.id} is over but still referred to"
        self.dead_refs.clear()
        finished = core.counters.finished
        assert finished == self.submitted - len(self.live), (finished, self.submitted)

    def note_cancelled_by_callers(self) -> None:
        """Jobs whose caller cancelled them have their outcome once the core drops them."""
        for job_id in sorted(self.live):
            info = self.info[job_id]
            if info.future.state == "cancelled" and info.ref() is None:
                self.over(info, "cancelled")

    def run(self) -> None:
        try:
            self.core.fleet.top_up()  # as the supervisor's thread does first
            self.execute()
            for _ in range(self.steps):
                self.step()
                self.note_cancelled_by_callers()
                self.check()
            self.close()
            self.note_cancelled_by_callers()
            self.check()
            for _ in range(20_000):
                if self.core.finished:
                    # Only once every process it was given is gone (abandoned starts aside).
                    assert not self.sim_workers, f"finished before {sorted(self.sim_workers)}"
                    break
                self.step()
                if self.rng.random() < 0.05:
                    self.close()  # again: now or later, without waiting
                self.note_cancelled_by_callers()
                self.check()
            assert self.core.finished, "the pool never finished shutting down"
            assert not self.live, f"jobs without an outcome: {sorted(self.live)}"
            assert not self.core.queue and not self.core.idle and not self.core.workers
        except AssertionError as exc:
            trace = "\n  ".join(self.trace)
            raise AssertionError(
                f"seed {self.seed}: {exc}\nlast events:\n  {trace}\n(replay: pytest "
                f"tests/test_supervisor_simulation.py --simulation-seed {self.seed} "
                f"--simulation-steps {self.steps})"
            ) from exc


@pytest.fixture
def steps(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--simulation-steps"))


def seeds(config: pytest.Config) -> list[int]:
    seed = config.getoption("--simulation-seed")
    return list(SEEDS) if seed is None else [int(seed)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" in metafunc.fixturenames:
        metafunc.parametrize("seed", seeds(metafunc.config))


def test_the_core_keeps_its_invariants_under_random_interleavings(seed: int, steps: int) -> None:
    gc.disable()  # a job kept only by a reference cycle would be "released" late, not at once
    try:
        simulation = Simulation(seed, steps)
        simulation.run()  # checks the invariants after every step
    finally:
        gc.enable()
    # Every job submitted ended exactly once, and the run was no idle one: jobs completed.
    outcomes = [info.outcomes for info in simulation.info.values()]
    assert simulation.submitted == len(outcomes) > 0
    assert all(len(each) == 1 for each in outcomes)
    assert any(each == ["completed"] for each in outcomes)
    assert any(info.lapsed for info in simulation.info.values())  # leases were exercised
