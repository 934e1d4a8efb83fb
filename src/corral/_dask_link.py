"""The connection to a Dask cluster, on a thread and event loop of its own.

The Dask client (and, without an address, an embedded ``LocalCluster``) lives on that loop, so
the app's loop never waits on Dask. A background task keeps the connection: it opens a client,
watches it, and after it was lost (or could not be opened) opens a new one, retrying with
back-off. While the scheduler is away, :meth:`ClusterLink.client` says why instead of waiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import dask
import distributed as _distributed

logger = logging.getLogger("corral.dask")
distributed: Any = _distributed  # called as untyped: its signatures vary across versions

CONNECT_TIMEOUT = 5.0
"""Seconds one attempt to reach the Dask scheduler may take."""
RETRY_DELAYS = (0.5, 10.0)
"""First and longest pause between two attempts to reach it."""
_WATCH_EVERY = 0.25  # seconds between two looks at the client's connection
_REFRESH_EVERY = 4  # looks between two readings of the workers' state from the scheduler
_EMBEDDED_CONFIG = {
    # A worker that dies fails the runs it held: corral tells a started run from one that was
    # only waiting there, and sends the latter again itself.
    "distributed.scheduler.allowed-failures": 0,
    # Runs hold no data for Dask to spill; only the memory limit itself counts.
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
}


class ClusterLink:
    """A Dask client kept connected, on the link's own thread and loop.

    Args:
        address: The Dask scheduler's address; ``None``: start an embedded ``LocalCluster``
            (``workers`` processes of one thread, ``max_memory`` bytes each) on first use.
        topic: The events topic to subscribe to; ``on_event`` handles each, on the link's loop.
    """

    def __init__(
        self,
        address: str | None,
        *,
        workers: int,
        max_memory: int | None,
        topic: str,
        on_event: Callable[[Any], None],
        name: str,
    ) -> None:
        self.address = address
        self.size = workers
        self.max_memory = max_memory
        self.topic = topic
        self.name = name
        self._on_event = on_event
        self._lock = threading.Lock()
        self._worker_info: dict[str, dict[str, Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._cluster: Any = None
        self._connected_once = False
        self._outage: str | None = None  # why the scheduler is away, while it is
        self._attempted: asyncio.Event | None = None  # set once the first attempt is over
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._watch: asyncio.Task[Any] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # -- any thread -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread and its loop; connecting goes on in the background."""
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(loop,), name=self.name)
        self._thread.start()
        self.run(self._begin()).result()

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Run ``coroutine`` on the link's loop; its future, for any thread."""
        assert self._loop is not None, "the link has not been started"
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Call ``callback`` on the link's loop (nothing if that loop has closed)."""
        assert self._loop is not None, "the link has not been started"
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until connected with workers (all of an embedded cluster's); ``True`` if so."""
        if self._loop is None:
            return False
        waiting = self.run(self._ready())
        try:
            return bool(waiting.result(timeout))
        except (TimeoutError, concurrent.futures.TimeoutError):
            waiting.cancel()
            return False

    def worker_info(self) -> dict[str, dict[str, Any]]:
        """The workers as the scheduler last described them, by address."""
        with self._lock:
            return dict(self._worker_info)

    @property
    def connected(self) -> bool:
        return self._client is not None and self._outage is None

    def scheduler_address(self) -> str:
        if self.address is not None:
            return self.address
        cluster = self._cluster
        return str(cluster.scheduler_address) if cluster is not None else "(embedded, starting)"

    # -- the link's loop ------------------------------------------------------------------------

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coroutine`` as a task of the link (cancelled at close if still running)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def client(self) -> tuple[Any, str]:
        """The connected client, or ``None`` and why there is none. While corral has never
        connected yet, this waits for the first attempt."""
        assert self._attempted is not None
        if not self._connected_once and not self._closing:
            await self._attempted.wait()
        client = self._client
        if self._closing:
            return None, "corral is shutting down"
        if client is None or client.status != "running" or self._outage is not None:
            return None, self._outage or "not connected"
        return client, ""

    def current(self) -> Any:
        """The client now, connected or not (``None`` between two)."""
        return self._client

    async def close(self) -> None:
        """Stop watching, then close the client and an embedded cluster (its workers exit)."""
        assert self._wake is not None and self._attempted is not None
        self._closing = True
        self._wake.set()
        self._attempted.set()
        if self._watch is not None:  # let a connection being opened finish, then close it
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._watch), CONNECT_TIMEOUT * 3)
        client, self._client = self._client, None
        if client is not None:
            await close_quietly(client)
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cluster.close(), 30)

    def stop(self) -> None:
        """Cancel what is left and stop the loop (its thread then ends)."""
        for task in list(self._background):
            task.cancel()
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.stop)

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _begin(self) -> None:
        self._attempted = asyncio.Event()
        self._wake = asyncio.Event()
        self._watch = self.spawn(self._keep_connected())

    async def _keep_connected(self) -> None:
        assert self._attempted is not None
        delay = RETRY_DELAYS[0]
        ticks = 0
        while not self._closing:
            ticks += 1
            client = self._client
            if client is None:
                try:
                    await self._open()
                except Exception as exc:
                    self._went_away(f"it cannot be reached: {reason(exc)}")
                    self._attempted.set()
                    await self._pause(delay)
                    delay = min(delay * 2, RETRY_DELAYS[1])
                    continue
                self._attempted.set()
                delay = RETRY_DELAYS[0]
            elif client.status != "running":
                self._client = None
                self._went_away("the connection to it was lost")
                self.spawn(close_quietly(client))
                continue
            elif ticks % _REFRESH_EVERY == 0:
                await self._refresh_workers(client)
            await self._pause(_WATCH_EVERY)

    async def _open(self) -> None:
        target: Any = self.address
        if target is None:
            if self._cluster is None:
                with dask.config.set(_EMBEDDED_CONFIG):
                    self._cluster = await distributed.LocalCluster(
                        # Each nanny passes this to the workers it starts, restarts included
                        # (the global config is back to the user's after this block).
                        config=copy.deepcopy(dask.config.config),
                        n_workers=self.size,
                        threads_per_worker=1,
                        processes=True,
                        memory_limit=self.max_memory or 0,
                        # No dashboard; its HTTP server (health checks) on a free loopback port,
                        # not 8787 (taken when another cluster runs: Dask then warns).
                        dashboard_address="127.0.0.1:0",
                        scheduler_kwargs={"dashboard": False},
                        asynchronous=True,
                    )
            target = self._cluster
        client = distributed.Client(
            target, asynchronous=True, set_as_default=False, timeout=CONNECT_TIMEOUT
        )
        try:
            await asyncio.wait_for(client, CONNECT_TIMEOUT * 2)
            client.subscribe_topic(self.topic, self._on_event)
            await self._refresh_workers(client)
        except BaseException:
            await close_quietly(client)
            raise
        self._client = client
        back, self._outage = self._outage, None
        address = self.scheduler_address()
        if back is not None and self._connected_once:
            logger.info("corral: the Dask scheduler at %s is back; runs go to it again", address)
        else:
            logger.info(
                "corral: connected to the Dask scheduler at %s (%d worker(s))",
                address,
                len(self._worker_info),
            )
        if not self._connected_once and self.address is not None:
            self._warn_about_memory()
        self._connected_once = True

    def _went_away(self, why: str) -> None:
        if self._outage is None:
            logger.warning(
                "corral: the Dask scheduler at %s is unavailable (%s): runs sent to it fail "
                "with ClusterUnavailableError until it is back; reconnecting in the background",
                self.scheduler_address(),
                why,
            )
        self._outage = why

    def _warn_about_memory(self) -> None:
        """max_memory cannot be enforced on a cluster corral did not start: say so, once."""
        if self.max_memory is None:
            return
        limits = sorted({info.get("memory_limit") or 0 for info in self._worker_info.values()})
        logger.warning(
            "corral: max_memory=%d is not enforced on the Dask cluster at %s, which corral did "
            "not start: its workers' own memory limits apply (%s); start them with "
            "--memory-limit",
            self.max_memory,
            self.address,
            ", ".join(f"{limit} bytes" if limit else "none" for limit in limits)
            or "no worker has joined yet",
        )

    async def _refresh_workers(self, client: Any) -> None:
        try:
            identity = await asyncio.wait_for(client.scheduler.identity(), CONNECT_TIMEOUT)
        except Exception:  # the watch notices a lost connection by the client's status
            return
        workers = dict(identity.get("workers", {}))
        for address, info in workers.items():
            if address not in self._worker_info and not info.get("nanny"):
                logger.warning(
                    "corral: Dask worker %s has no nanny: a run past its timeout there cannot "
                    "be stopped by restarting it (it is shut down instead); start workers with "
                    "a nanny (the default of 'dask worker')",
                    address,
                )
        with self._lock:
            self._worker_info = workers
        self._keep_size()

    def _keep_size(self) -> None:
        """An embedded cluster gets back a worker whose restart took longer than Dask's
        ``lost-worker-timeout`` (a busy machine): ``LocalCluster`` then closes its nanny and
        drops it for good, unless asked to start its workers again."""
        cluster = self._cluster
        if cluster is None or self._closing or len(cluster.workers) >= self.size:
            return
        logger.warning(
            "corral: the embedded Dask cluster lost a worker whose restart took too long; "
            "starting a new one (%d of %d running)",
            len(cluster.workers),
            self.size,
        )
        cluster.scale(self.size)

    async def _pause(self, seconds: float) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _ready(self) -> bool:
        wanted = self.size if self.address is None else 1
        while True:
            client = self._client
            if client is not None and self._outage is None:
                await self._refresh_workers(client)
                info = self._worker_info.values()
                running = sum(1 for w in info if w.get("status", "running") == "running")
                cluster = self._cluster  # a worker whose nanny is being dropped is not back
                if running >= wanted and (cluster is None or len(cluster.workers) >= wanted):
                    return True
            await asyncio.sleep(0.1)


async def close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), CONNECT_TIMEOUT)


def reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
