"""The ledger against real databases (SQLite, and PostgreSQL when one is configured): claims,
instances across replicas, leases, lost runs, history and retention."""

from __future__ import annotations

import functools
import multiprocessing
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from conftest import wait_until
from corral._ledger import Claim, Coordinator, Ledger
from corral._ledger._records import ERROR_TEXT_LIMIT, ClaimRequest, from_micros, micros

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class Clock:
    """Wall-clock seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def replicas(database_url: str, clock: Clock) -> Iterator[list[Ledger]]:
    """Two replicas sharing one database, registered."""
    ledgers = [Ledger(database_url, lease=10, clock=clock) for _ in range(2)]
    for ledger in ledgers:
        ledger.join()
    yield ledgers
    for ledger in ledgers:
        ledger.close()


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_fire_is_won_by_the_first_claim_and_taken_for_every_other(replicas: list[Ledger]) -> None:
    a, b = replicas
    [won] = a.claim("report", [at(0)], max_instances=5)
    [taken] = b.claim("report", [at(0)], max_instances=5)
    [again] = a.claim("report", [at(0)], max_instances=5)
    assert won.claim is Claim.WON and won.run_id is not None
    assert taken.claim is Claim.TAKEN and taken.run_id is None
    assert again.claim is Claim.TAKEN
    [run] = a.runs(task="report")
    assert (run.status, run.scheduled, run.host, run.pid) == ("claimed", at(0), a.host, a.pid)
    assert run.replica == a.replica


def test_max_instances_counts_runs_in_progress_on_every_replica(replicas: list[Ledger]) -> None:
    a, b = replicas
    [first] = a.claim("sync", [at(0)], max_instances=1)
    [second] = b.claim("sync", [at(1)], max_instances=1)
    assert (first.claim, second.claim) == (Claim.WON, Claim.FULL)
    # The fire past the limit is recorded once, as skipped, and no other replica runs it.
    [third] = a.claim("sync", [at(1)], max_instances=1)
    assert third.claim is Claim.TAKEN
    skipped = b.runs(task="sync", status="skipped")
    assert [r.scheduled for r in skipped] == [at(1)]
    assert "max_instances=1" in (skipped[0].error or "")
    assert first.run_id is not None
    assert a.finish(first.run_id, "executed", started_at=a._clock() - 2)
    [fourth] = b.claim("sync", [at(2)], max_instances=1)
    assert fourth.claim is Claim.WON
    assert b.in_progress("sync") == 1


def test_run_times_handed_over_together_are_one_instance(replicas: list[Ledger]) -> None:
    a, b = replicas
    results = a.claim("catch_up", [at(0), at(1), at(2)], max_instances=1)
    assert [r.claim for r in results] == [Claim.WON] * 3
    assert a.in_progress("catch_up") == 1
    [late] = b.claim("catch_up", [at(3)], max_instances=1)
    assert late.claim is Claim.FULL


def test_an_outcome_is_recorded_with_its_details_and_bounded_error(
    replicas: list[Ledger], clock: Clock
) -> None:
    a, _ = replicas
    [won] = a.claim("job", [at(0)], max_instances=1)
    assert won.run_id is not None
    started = clock.now
    clock.now += 3.5
    assert a.finish(won.run_id, "error", error="x" * 50_000, worker_pid=4242, started_at=started)
    [run] = a.runs(task="job")
    assert run.status == "error" and run.finished
    assert run.worker_pid == 4242
    assert run.duration == pytest.approx(3.5)
    assert run.error is not None and len(run.error) <= ERROR_TEXT_LIMIT
    assert run.error.endswith("[cut]")
    # A finished run is final: a second outcome changes nothing.
    assert not a.finish(won.run_id, "executed")
    assert a.runs(task="job")[0].status == "error"
    # The same outcome again is a retry of a write whose answer was lost: it was recorded.
    assert a.finish(won.run_id, "error", error="x")
    assert a.runs(task="job")[0].error == run.error


def test_an_error_text_is_stored_whatever_characters_it_holds(replicas: list[Ledger]) -> None:
    """PostgreSQL refuses NUL in text, and no database stores a lone surrogate: both are
    written escaped."""
    a, _ = replicas
    [won] = a.claim("job", [at(0)], max_instances=1)
    assert won.run_id is not None
    assert a.finish(won.run_id, "error", error="ValueError: bad\x00byte \udcff")
    assert a.runs(task="job")[0].error == "ValueError: bad\\x00byte \\udcff"


def test_a_refused_outcome_costs_only_its_details_and_never_holds_the_lease_up(
    database_url: str,
) -> None:
    """A value the database refuses (a pid too large for its column) is not the database being
    away: that outcome is recorded with its status alone, the others written with it as they
    are, and the lease goes on being renewed."""
    coordinator = Coordinator(Ledger(database_url, lease=3), on_lost=lambda _: None)
    coordinator.start()
    try:
        claimed: list[Any] = []
        coordinator.claim("job", [at(0), at(1)], 5, lambda results, _: claimed.append(results))
        [[first, second]] = wait_until(lambda: claimed, 30, "the claims")
        assert first.run_id is not None and second.run_id is not None
        answers: dict[str, bool | None] = {}
        coordinator.finish(
            first.run_id,
            "error",
            error="x",
            worker_pid=2**70,
            recorded=functools.partial(answers.__setitem__, "first"),
        )
        coordinator.finish(
            second.run_id,
            "executed",
            worker_pid=7,
            recorded=functools.partial(answers.__setitem__, "second"),
        )
        wait_until(lambda: len(answers) == 2, 30, "both outcomes answered")
        assert answers == {"first": True, "second": True}
        held_until = coordinator.ledger.held.state[1]
        wait_until(lambda: coordinator.ledger.held.state[1] > held_until, 30, "the lease renewed")
        stats = coordinator.statistics()
        assert stats.available and stats.unrecorded_outcomes == 0
    finally:
        coordinator.stop()
    reader = Ledger(database_url)
    try:
        runs = {run.scheduled: run for run in reader.runs(task="job")}
    finally:
        reader.close()
    assert (runs[at(0)].status, runs[at(0)].worker_pid, runs[at(0)].error) == ("error", None, None)
    assert (runs[at(1)].status, runs[at(1)].worker_pid) == ("executed", 7)


def test_a_claim_the_database_refuses_fails_alone(database_url: str) -> None:
    """Claims queued together share one transaction; one whose task name the database refuses
    (no database stores a lone surrogate) fails alone, not the claims beside it."""
    ledger = Ledger(database_url)
    coordinator = Coordinator(ledger, on_lost=lambda _: None)
    try:
        ledger.join()
        refused, won = coordinator._claim(
            [ClaimRequest("bad\ud800", [at(0)], 1), ClaimRequest("good", [at(0)], 1)]
        )
        assert isinstance(refused, Exception)
        assert not isinstance(won, BaseException) and won[0].claim is Claim.WON
        assert coordinator.statistics().claims_failed == 1
        assert coordinator.statistics().available
    finally:
        ledger.close()


def test_an_expired_lease_makes_its_runs_lost_once(replicas: list[Ledger], clock: Clock) -> None:
    a, b = replicas
    [won] = a.claim("nightly", [at(0)], max_instances=1)
    assert won.run_id is not None
    clock.now += 5
    assert b.renew()
    assert b.reap() == []  # a's lease is still current
    clock.now += 6  # a renewed nothing for 11 s; its lease was 10 s
    assert b.renew()
    [lost] = b.reap()
    assert (lost.task, lost.scheduled, lost.host, lost.pid) == ("nightly", at(0), a.host, a.pid)
    assert b.reap() == []  # found once, by one replica
    [run] = b.runs(task="nightly")
    assert run.status == "lost" and f"pid {a.pid}" in (run.error or "")
    assert [r.id for r in b.replicas()] == [b.replica]
    # The lost replica comes back: its late outcome does not overwrite "lost"; it re-registers.
    assert not a.finish(won.run_id, "executed")
    assert not a.renew()
    assert a.renew()
    assert sorted(r.id for r in b.replicas()) == sorted([a.replica, b.replica])
    # The lost run's instance is released.
    [next_run] = b.claim("nightly", [at(60)], max_instances=1)
    assert next_run.claim is Claim.WON


def test_a_replica_knows_until_when_its_lease_surely_holds_and_in_which_term(
    database_url: str, clock: Clock
) -> None:
    """On its own clock, without asking the database: from when its last write of the lease
    began, for the lease less a margin (a tenth, at most 1 s). Reaped and registered again, it
    holds a new term; runs claimed in the old one never hold again, whatever the clock says."""
    a, b = (Ledger(database_url, lease=10, clock=clock, monotonic=clock) for _ in range(2))
    try:
        a.join()
        b.join()
        [first] = a.claim("sync", [at(0)], max_instances=5)
        assert first.term == a.held.term == 1
        clock.now += 8.9
        assert a.held.holds(1) and not a.held.holds(2)
        clock.now += 0.2  # past the lease less its margin: another replica may soon reap it
        assert not a.held.holds(1)
        assert a.renew()  # nobody had: the same term, renewed
        assert a.held.holds(1)
        clock.now += 11
        b.renew()
        assert [run.run_id for run in b.reap()] == [first.run_id]
        [second] = a.claim("sync", [at(1)], max_instances=5)  # registers again, in a new term
        assert second.term == a.held.term == 2
        assert a.held.holds(2) and not a.held.holds(1)
        assert first.run_id is not None and not a.finish(first.run_id, "executed")
        a.leave()
        assert not a.held.holds(2)
    finally:
        a.close()
        b.close()


def test_a_replica_that_claims_before_it_could_join_keeps_its_term_when_it_joins(
    database_url: str, clock: Clock
) -> None:
    """A claim registers a replica that could not join yet (the database was away when it
    started); joining later renews that registration in the same term, so the runs claimed
    meanwhile still hold."""
    first = Ledger(database_url, lease=10, clock=clock, monotonic=clock)
    late = Ledger(database_url, lease=10, clock=clock, monotonic=clock)
    try:
        first.join()  # (the tables)
        [claimed] = late.claim("sync", [at(0)], max_instances=5)
        assert claimed.term == 1
        late.join()
        assert late.held.term == 1 and late.held.holds(1)
    finally:
        first.close()
        late.close()


def test_a_lost_run_can_be_claimed_again_as_a_new_attempt(
    replicas: list[Ledger], clock: Clock
) -> None:
    a, b = replicas
    a.claim("important", [at(0)], max_instances=1)
    clock.now += 11
    b.renew()
    [lost] = b.reap()
    [rerun] = b.claim("important", [lost.scheduled], 1, attempt=lost.attempt + 1)
    [twice] = a.claim("important", [lost.scheduled], 1, attempt=lost.attempt + 1)
    assert (rerun.claim, twice.claim) == (Claim.WON, Claim.TAKEN)
    assert [(r.attempt, r.status) for r in b.runs(task="important")] == [
        (1, "claimed"),
        (0, "lost"),
    ]


def test_runs_left_when_every_replica_was_down_are_found_by_the_next_to_start(
    database_url: str, clock: Clock
) -> None:
    gone = Ledger(database_url, lease=10, clock=clock)
    gone.join()
    gone.claim("backup", [at(0), at(1)], max_instances=1)
    gone.close()  # it died: no leave()
    clock.now += 3600
    fresh = Ledger(database_url, lease=10, clock=clock)
    try:
        fresh.join()
        lost = fresh.reap()
        assert sorted(r.scheduled for r in lost) == [at(0), at(1)]
        assert {r.status for r in fresh.runs(task="backup")} == {"lost"}
    finally:
        fresh.close()


def test_leaving_records_unfinished_runs_cancelled(replicas: list[Ledger]) -> None:
    a, b = replicas
    a.claim("slow", [at(0)], max_instances=1)
    [left] = a.leave()
    assert left.scheduled == at(0)
    [run] = b.runs(task="slow")
    assert run.status == "cancelled"
    assert [r.id for r in b.replicas()] == [b.replica]


def test_replicas_show_what_each_is_running(replicas: list[Ledger]) -> None:
    a, b = replicas
    a.claim("one", [at(0)], max_instances=1)
    b.claim("two", [at(0)], max_instances=1)
    shown = {r.id: [run.task for run in r.running] for r in a.replicas()}
    assert shown == {a.replica: ["one"], b.replica: ["two"]}


def test_history_filters_and_retention(replicas: list[Ledger], clock: Clock) -> None:
    a, _ = replicas
    for second in range(5):
        [won] = a.claim("tick", [at(second)], max_instances=1)
        assert won.run_id is not None
        a.finish(won.run_id, "executed" if second % 2 else "error", started_at=clock.now)
        clock.now += 86_400  # one run a day
    a.claim("other", [at(0)], max_instances=1)
    assert [r.scheduled for r in a.runs(task="tick", limit=2)] == [at(4), at(3)]
    assert [r.scheduled for r in a.runs(task="tick", status="error")] == [at(4), at(2), at(0)]
    assert [r.scheduled for r in a.runs(task="tick", since=at(3))] == [at(4), at(3)]
    assert len(a.runs()) == 6
    # Finished more than 2.5 days ago: the first three; the run in progress is never pruned.
    assert a.prune(timedelta(days=2.5)) == 3
    assert [r.scheduled for r in a.runs(task="tick")] == [at(4), at(3)]
    assert len(a.runs(task="other")) == 1


def test_scheduled_times_keep_their_identity_to_the_microsecond() -> None:
    moment = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    assert from_micros(micros(moment)) == moment
    assert micros(moment.astimezone(timezone_east())) == micros(moment)
    with pytest.raises(ValueError, match="no time zone"):
        micros(moment.replace(tzinfo=None))


def timezone_east() -> tzinfo:
    from zoneinfo import ZoneInfo

    return ZoneInfo("Asia/Tokyo")


def test_an_unreachable_database_raises_the_drivers_error(tmp_path: Path) -> None:
    ledger = Ledger("postgresql://nobody@127.0.0.1:9/none")
    try:
        with pytest.raises(OperationalError):
            ledger.join()
    finally:
        ledger.close()


# -- races between processes ----------------------------------------------------------------------

FIRES = 600


def _claim_all(url: str, start: multiprocessing.synchronize.Barrier, out: str) -> None:
    ledger = Ledger(url)
    ledger.join()
    lines = []
    for i in range(FIRES):
        if i % 50 == 0:
            start.wait()  # both race for the next fifty fires together, whatever the load
        [result] = ledger.claim("race", [at(i)], 10**6)
        lines.append(f"{i} {result.claim.value}")
    Path(out).write_text("\n".join(lines))
    ledger.close()


@pytest.mark.timeout(300)  # a race, not a speed test: the time is the machine's load
def test_two_processes_claiming_the_same_fires_win_each_exactly_once(
    database_url: str, tmp_path: Path
) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    outs = [tmp_path / f"claims-{n}.txt" for n in range(2)]
    procs = [
        context.Process(target=_claim_all, args=(database_url, start, str(out))) for out in outs
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        assert proc.exitcode == 0
    results = [dict(line.split() for line in out.read_text().splitlines()) for out in outs]
    for side in results:
        assert len(side) == FIRES  # each process tried every fire
    for i in map(str, range(FIRES)):
        assert sorted([results[0][i], results[1][i]]) == ["taken", "won"], i


def test_a_rerun_past_max_instances_records_nothing_until_an_instance_is_free(
    replicas: list[Ledger],
) -> None:
    a, b = replicas
    [running] = a.claim("report", [at(60)], max_instances=1)
    [waiting] = b.claim("report", [at(0)], 1, attempt=1)
    assert (waiting.claim, waiting.run_id) == (Claim.FULL, None)
    assert [(r.attempt, r.status) for r in b.runs(task="report")] == [(0, "claimed")]
    assert running.run_id is not None and a.finish(running.run_id, "executed")
    [won] = b.claim("report", [at(0)], 1, attempt=1)
    assert won.claim is Claim.WON
