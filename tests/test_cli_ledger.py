"""``corral runs`` and ``corral status`` against a real ledger database."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from corral._cli import main
from corral._ledger import Ledger

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)


@pytest.fixture
def filled(database_url: str) -> str:
    """A ledger with a finished run of ``a`` 3 h ago, a failed one 2 h ago and one of ``b``
    running now, claimed by a live replica."""
    ledger = Ledger(database_url)
    ledger.join()
    [first] = ledger.claim("a", [T0], 1)
    assert first.run_id is not None
    ledger.finish(first.run_id, "executed", worker_pid=11, started_at=T0.timestamp())
    [second] = ledger.claim("a", [T0 + timedelta(hours=1)], 1)
    assert second.run_id is not None
    ledger.finish(second.run_id, "error", error="ValueError: bad input\nTraceback ...")
    ledger.claim("b", [T0 + timedelta(hours=3)], 1)
    ledger.close()  # no leave(): it stays live until its lease expires
    return database_url


def test_runs_prints_a_table_filtered_by_task_and_status(
    filled: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["runs", "--database", filled]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["task", "scheduled", "(UTC)", "status"]
    assert [line.split()[0] for line in lines[1:]] == ["b", "a", "a"]
    assert main(["runs", "--database", filled, "--task", "a", "--status", "error"]) == 0
    out = capsys.readouterr().out
    assert "ValueError: bad input" in out and "Traceback" not in out
    assert len(out.splitlines()) == 2


def test_runs_as_json_since_a_duration_with_a_limit(
    filled: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["runs", "--database", filled, "--since", "150m", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [(r["task"], r["status"]) for r in runs] == [("b", "claimed"), ("a", "error")]
    assert datetime.fromisoformat(runs[1]["scheduled"]) == T0 + timedelta(hours=1)
    assert main(["runs", "--database", filled, "--limit", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


def test_status_shows_live_replicas_and_what_each_runs(
    filled: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_DATABASE", filled)  # no --database: the environment's
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "replica" in out.splitlines()[0]
    assert f"b@{(T0 + timedelta(hours=3)):%Y-%m-%d %H:%M:%S}" in out
    assert main(["status", "--json"]) == 0
    [replica] = json.loads(capsys.readouterr().out)
    assert [run["task"] for run in replica["running"]] == ["b"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["runs"], "no database: pass --database URL or set CORRAL_DATABASE"),
        (["runs", "--database", "mysql://x/y"], "database='mysql://x/y' is not a database URL"),
        (
            ["status", "--database", "postgresql://nobody@127.0.0.1:9/none"],
            "cannot read the ledger in Ledger('postgresql://nobody@127.0.0.1:9/none')",
        ),
    ],
)
def test_ledger_commands_explain_what_is_wrong(
    argv: list[str],
    expected: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CORRAL_DATABASE", raising=False)
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_since_refuses_what_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["runs", "--database", f"sqlite:///{tmp_path / 'c.db'}", "--since", "yesterday"])
    assert "'yesterday' is neither a duration (30m, 2h, 7d) nor a time" in capsys.readouterr().err


def test_an_empty_ledger_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert main(["runs", "--database", url]) == 0
    assert main(["status", "--database", url]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "no runs recorded (yet) with these filters",
        "no live replica",
    ]
