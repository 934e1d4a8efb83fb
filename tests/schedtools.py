"""Helpers for scheduler tests: record asyncz events and wait for them, never sleep."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from asyncz.events.base import SchedulerEvent
from asyncz.events.constants import ALL_EVENTS

from corral import Scheduler


class Recorder:
    """Collects a scheduler's events; ``wait`` returns once enough match, or fails the test."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def __call__(self, event: SchedulerEvent) -> None:
        # Thread executors report from their threads: hop to the test's loop to wake it.
        self.events.append(event)
        self._loop.call_soon_threadsafe(self._changed.set)

    def attach(self, scheduler: Scheduler, mask: int = ALL_EVENTS) -> Recorder:
        assert scheduler.asyncz is not None
        scheduler.asyncz.add_listener(self, mask)
        return self

    def matching(self, code: int, task_id: str | None = None) -> list[Any]:
        return [
            e for e in self.events if e.code == code and (task_id is None or e.task_id == task_id)
        ]

    async def wait(
        self, predicate: Callable[[], Any], timeout: float = 60, what: str = "events"
    ) -> Any:
        async def loop() -> Any:
            while not (value := predicate()):
                self._changed.clear()
                await self._changed.wait()
            return value

        try:
            return await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; got "
                f"{[(e.code, getattr(e, 'task_id', None)) for e in self.events]}"
            ) from None

    async def count(self, code: int, task_id: str | None, n: int, timeout: float = 60) -> list[Any]:
        return await self.wait(  # type: ignore[no-any-return]
            lambda: len(found := self.matching(code, task_id)) >= n and found,
            timeout,
            f"{n} events of code {code} for {task_id!r}",
        )
