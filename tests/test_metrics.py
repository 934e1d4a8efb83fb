"""Prometheus metrics: ``corral run --metrics-port`` over real HTTP, and ``CorralCollector`` in an
app's own registry."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from asyncz.events.constants import TASK_ERROR, TASK_EXECUTED
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import jobs
from corral import Scheduler, SchedulerConfig
from corral._cli import main
from corral.metrics import CorralCollector
from schedtools import Recorder
from test_cli import corral_run


@pytest.fixture(autouse=True)
def fresh_task_modules() -> Iterator[None]:
    yield
    sys.modules.pop("cli_tasks", None)


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list[Sample], name: str, **labels: str) -> float:
    matching = [s.value for s in found if s.name == name and labels.items() <= s.labels.items()]
    assert len(matching) == 1, (name, labels, matching)
    return matching[0]


def test_corral_run_serves_metrics_over_http() -> None:
    with corral_run("cli_log_tasks", "--metrics-port", "0", "--metrics-host", "127.0.0.1") as (
        process,
        output,
    ):
        line = output.wait_for(r"msg=serving metrics at http://127\.0\.0\.1:\d+/metrics$")
        url = line.split("msg=serving metrics at ")[1].strip()
        output.wait_for(r"event=outcome task=fails kind=failed")
        output.wait_for(r"event=outcome task=talks kind=executed")
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    found = samples(text)
    assert value(found, "corral_runs_total", task="talks", outcome="completed") >= 1
    assert value(found, "corral_runs_total", task="fails", outcome="failed") >= 1
    assert value(found, "corral_runs_total", task="in-thread", outcome="completed") >= 1
    assert value(found, "corral_run_duration_seconds_count", task="talks") >= 1
    assert value(found, "corral_run_duration_seconds_bucket", task="talks", le="+Inf") >= 1
    assert value(found, "corral_run_queue_wait_seconds_count", task="fails") >= 1
    workers = sum(value(found, "corral_workers", state=s) for s in ("idle", "busy", "starting"))
    assert workers == 1  # cli_log_tasks: workers=1
    assert [s for s in found if s.name == "corral_worker_rss_bytes" and s.value > 2**20]
    assert value(found, "corral_pool_jobs_total", outcome="failed") >= 1
    assert value(found, "corral_worker_restarts_total") == 0
    assert value(found, "corral_event_loop_lag_max_seconds") >= 0
    assert value(found, "process_resident_memory_bytes") > 0  # the app process itself


def test_a_metrics_port_in_use_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        argv = ["run", "cli_tasks", "--metrics-port", port, "--metrics-host", "127.0.0.1"]
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"corral: cannot serve metrics on 127.0.0.1:{port}: ")
    assert err.count("\n") == 1


def test_without_prometheus_client_the_option_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "corral.metrics")
    assert main(["run", "cli_tasks", "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "corral: --metrics-port needs prometheus_client: pip install 'corral[metrics]'\n"


def test_importing_corral_and_its_command_leaves_prometheus_client_out() -> None:
    code = (
        "import sys, corral, corral._cli, corral._monitor\n"
        "from corral import Scheduler\n"
        "print('prometheus_client' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "False"


def test_the_collector_in_an_app_registry_counts_runs_crashes_and_restarts() -> None:
    async def scenario() -> tuple[str, int, int]:
        config = SchedulerConfig(enabled=True, workers=1, mistrigger_grace_time=None)
        scheduler = Scheduler(config, tasks=[])
        scheduler.add_task(jobs.pid, trigger="interval", seconds=0.2, name="pid")
        scheduler.add_task(jobs.segfault, trigger="interval", seconds=0.2, name="crash")
        registry = CollectorRegistry()
        collector = CorralCollector(scheduler)
        registry.register(collector)
        before_start = generate_latest(registry).decode()
        assert not [s for s in samples(before_start) if s.name.startswith("corral_")]
        async with scheduler:
            assert collector.attach()
            recorder = Recorder().attach(scheduler)
            await recorder.count(TASK_EXECUTED, "pid", 2, timeout=60)
            await recorder.count(TASK_ERROR, "crash", 1, timeout=60)
            stats = scheduler.statistics()
            assert stats is not None
            text = generate_latest(registry).decode()
            after = scheduler.statistics()
            assert after is not None
        return text, stats.restarts, after.restarts

    text, restarts_before, restarts_after = asyncio.run(scenario())
    found = samples(text)
    assert value(found, "corral_runs_total", task="pid", outcome="completed") >= 2
    assert value(found, "corral_runs_total", task="crash", outcome="crashed") >= 1
    assert value(found, "corral_pool_jobs_total", outcome="crashed") >= 1
    assert restarts_before <= value(found, "corral_worker_restarts_total") <= restarts_after
    assert value(found, "corral_run_duration_seconds_count", task="pid") >= 2
    duration = value(found, "corral_run_duration_seconds_sum", task="pid")
    assert 0 <= duration < 60
    assert value(found, "corral_run_queue_wait_seconds_count", task="pid") >= 2
    assert value(found, "corral_event_loop_lag_seconds") >= 0
    assert not [s for s in found if s.name.startswith(("corral_ledger", "corral_dask"))]


def test_the_collector_shows_the_ledger_s_claims_with_a_database(tmp_path: Path) -> None:
    async def scenario() -> str:
        database = f"sqlite:///{tmp_path / 'corral.db'}"
        config = SchedulerConfig(enabled=True, workers=1, database=database)
        scheduler = Scheduler(config, tasks=[])
        scheduler.add_task(jobs.pid, trigger="interval", seconds=0.2, name="pid")
        registry = CollectorRegistry()
        registry.register(CorralCollector(scheduler))
        async with scheduler:
            recorder = Recorder().attach(scheduler)
            await recorder.count(TASK_EXECUTED, "pid", 1, timeout=60)
            return generate_latest(registry).decode()

    found = samples(asyncio.run(scenario()))
    assert value(found, "corral_ledger_available") == 1
    assert value(found, "corral_ledger_claims_total", result="won") >= 1
    assert value(found, "corral_ledger_claims_total", result="taken") == 0
    assert value(found, "corral_ledger_queries_total") >= 1


def test_the_collector_describes_its_metrics_so_a_registry_refuses_a_second_one() -> None:
    config = SchedulerConfig()  # never started: Ravyn's form, read at each scrape
    registry = CollectorRegistry()
    collector = CorralCollector(config)
    registry.register(collector)
    names = {family.name for family in collector.describe()}
    assert {"corral_runs", "corral_run_duration_seconds", "corral_workers"} <= names
    assert {"corral_ledger_claims", "corral_dask_runs", "corral_event_loop_lag_seconds"} <= names
    assert not re.search(r"^corral_", generate_latest(registry).decode(), flags=re.M)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(CorralCollector(config))
