"""The app's lease as runs on a Dask cluster read it: runs claimed under it start only while it
holds.

A run of a fire claimed in a database may be sent to the cluster, and wait there, while the app
is stopped or cut off from the database for longer than its lease; meanwhile another replica
may report the run lost and run it again. So a claimed run carries the term of the lease it was
claimed under, and the Dask worker reads the app's lease from the Dask scheduler right before it
starts the run (``_dask_worker.run``): past it, the run is not started, and ends with
``JobCancelledError``.

The app publishes ``{"term", "until"}`` in the scheduler's metadata under its link's token each
time its lease changes (``HeldLease.watch``), ``until`` on the wall clock: the workers compare
it with their own, so the margin ``HeldLease`` keeps (a tenth of the lease, at most 1 s) also
covers clocks of the app's and the workers' machines that disagree. A stopped app publishes
nothing, and its runs stop starting once the last ``until`` has passed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from corral._dask_link import ClusterLink
from corral._dask_worker import LEASE_RECORD

logger = logging.getLogger("corral.dask")


class PublishedLease:
    """The lease a ``DaskCluster`` holds, published on the Dask scheduler it is connected to.

    Args:
        link: The cluster's link (its loop publishes).
        token: The link's token: the lease is recorded under it.
    """

    def __init__(self, link: ClusterLink, token: str) -> None:
        self._link = link
        self.key = [LEASE_RECORD, token]
        """Where the lease is recorded in the scheduler's metadata (what a run reads)."""
        self._held: tuple[int, float] | None = None  # (term, wall-clock time it holds until)
        self._sent: tuple[Any, tuple[int, float]] | None = None  # (client, what it was sent)
        self._sending: asyncio.Lock | None = None

    def hold(self, term: int, seconds: float) -> None:
        """Runs claimed under ``term`` may start for ``seconds`` more (any thread; published
        in the background)."""
        self._held = (term, time.time() + seconds)
        self._link.call_soon(self._push)

    def _push(self) -> None:
        if self._link.current() is not None:
            self._link.spawn(self._publish_quietly())

    async def _publish_quietly(self) -> None:
        client = self._link.current()
        if client is None:
            return
        try:
            await self.publish(client)
        except Exception as exc:  # the connection went: the next run sent publishes it first
            logger.debug("corral: publishing the lease on the Dask scheduler failed: %s", exc)

    async def publish(self, client: Any) -> None:
        """Make sure the scheduler ``client`` is connected to has the lease held now (before a
        run claimed under it is sent there). Raises what the scheduler call raises."""
        if self._sending is None:
            self._sending = asyncio.Lock()
        async with self._sending:
            while (held := self._held) is not None and self._sent != (client, held):
                term, until = held
                await client.set_metadata(self.key, {"term": term, "until": until})
                self._sent = (client, held)
