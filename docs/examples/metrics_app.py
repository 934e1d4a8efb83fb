"""Prometheus metrics from an app's own registry: corral's collector beside the app's metrics.

Run it: ``python docs/examples/metrics_app.py`` (serves ``/metrics``, scrapes it once a report
has been built, prints corral's lines of the scrape, and stops). Needs ``corral[metrics]``.
"""

import asyncio
import urllib.request

from asyncz.events.constants import TASK_EXECUTED
from prometheus_client import CollectorRegistry, Counter, start_http_server

from corral import Scheduler, SchedulerConfig, scheduler
from corral.metrics import CorralCollector

registry = CollectorRegistry()  # the app's own, with its own metrics
pages = Counter("app_pages_served", "Pages the app served", registry=registry)


@scheduler(name="report", trigger="interval", seconds=1, timeout=30)
def build_report() -> int:
    return sum(i * i for i in range(200_000))  # in a worker process


async def main() -> None:
    built = asyncio.Event()
    async with Scheduler(SchedulerConfig(enabled=True, workers=2)) as running:
        registry.register(CorralCollector(running))  # made once it runs: counts every run
        assert running.asyncz is not None
        running.asyncz.add_listener(lambda event: built.set(), TASK_EXECUTED)
        server, _thread = start_http_server(0, "127.0.0.1", registry)
        await running.wait_ready(60)  # both workers started
        await asyncio.wait_for(built.wait(), 60)
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        scrape = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
        server.shutdown()
    wanted = (
        "corral_runs_total",
        "corral_run_duration_seconds_count",
        "corral_run_queue_wait_seconds_count",
        "corral_workers{",
        'corral_pool_jobs_total{outcome="completed"}',
        "corral_worker_restarts_total",
        "corral_event_loop_lag_seconds",
    )
    for line in scrape.splitlines():
        if line.startswith(wanted):
            print(line)


if __name__ == "__main__":
    asyncio.run(main())
