"""Timers on one clock, that can be cancelled and keep nothing alive once they are.

A heap of entries ``[when, sequence, target]``. Cancelling an entry drops its target at once (so
that a finished job's deadline keeps neither the job nor its result) and leaves the entry in the
heap until it reaches the top; the heap is rebuilt without them when they outnumber the live
ones, so it holds O(live timers) entries however many are armed and cancelled.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Generic, TypeVar

T = TypeVar("T")

_COMPACT_AT = 64  # cancelled entries tolerated before the heap may be rebuilt


class Timer(Generic[T]):
    """One armed timer: its deadline and what it is for (``None`` once cancelled or fired)."""

    __slots__ = ("sequence", "target", "when")

    def __init__(self, when: float, sequence: int, target: T) -> None:
        self.when = when
        self.sequence = sequence
        self.target: T | None = target

    def __lt__(self, other: Timer[T]) -> bool:
        return (self.when, self.sequence) < (other.when, other.sequence)


class Timers(Generic[T]):
    """Deadlines, each with a target; the earliest first, in the order armed on a tie."""

    def __init__(self) -> None:
        self._heap: list[Timer[T]] = []
        self._sequence = itertools.count()
        self._cancelled = 0

    def __len__(self) -> int:
        """Timers armed and not yet fired or cancelled."""
        return len(self._heap) - self._cancelled

    def arm(self, when: float, target: T) -> Timer[T]:
        timer = Timer(when, next(self._sequence), target)
        heapq.heappush(self._heap, timer)
        return timer

    def cancel(self, timer: Timer[T] | None) -> None:
        """Forget ``timer`` (nothing happens if it fired or was cancelled already)."""
        if timer is None or timer.target is None:
            return
        timer.target = None
        self._cancelled += 1
        if self._cancelled > _COMPACT_AT and 2 * self._cancelled > len(self._heap):
            self._heap = [entry for entry in self._heap if entry.target is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def next_at(self) -> float:
        """When the earliest live timer is due (``math.inf``: none is armed)."""
        heap = self._heap
        while heap and heap[0].target is None:
            heapq.heappop(heap)
            self._cancelled -= 1
        return heap[0].when if heap else math.inf

    def pop_due(self, now: float) -> T | None:
        """The target of the earliest timer due at ``now`` (it is fired); ``None``: none is."""
        if self.next_at() > now:
            return None
        timer = heapq.heappop(self._heap)
        target, timer.target = timer.target, None
        return target
