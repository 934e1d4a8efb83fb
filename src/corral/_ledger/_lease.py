"""``HeldLease``: what a replica knows of its own lease without asking the database.

Other replicas reap this one once its ``lease_until`` (their wall clock) has passed. This
replica wrote ``lease_until = wall time when the write began + lease``, so on its own clock
(``lease_clock``, which goes on while the machine is suspended) the lease surely holds until
``that clock when the write began + lease`` (less ``margin``, for clocks that disagree a
little). Past that, another replica may have reported its runs in progress lost (and rerun
them): nothing of such a run may start or be reported here until the database says whether it
did.

Each registration is a new *term*: a replica whose lease expired and that registers again holds
a new term, and runs claimed under the old one were reaped. A run is covered by the term it was
claimed in, and only while that term holds.

The state is one tuple, replaced whole: read from any thread without a lock.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

from corral._clock import lease_clock

logger = logging.getLogger("corral.ledger")

Watcher = Callable[[int, float], None]
"""Called with (term, seconds it holds from now) each time the lease changes."""


def margin_of(lease: float) -> float:
    """Seconds taken off the local view of a lease, for clocks that disagree: a tenth, at most
    one second."""
    return min(1.0, lease / 10)


class HeldLease:
    """This replica's lease, as far as it knows.

    Args:
        lease: The lease's length, in seconds.
        clock: ``lease_clock`` (replaceable in tests).
    """

    def __init__(self, lease: float, *, clock: Callable[[], float] = lease_clock) -> None:
        self.lease = lease
        self.margin = margin_of(lease)
        self.clock = clock
        self.state: tuple[int, float] = (0, -math.inf)  # (term, holds until): term 0 never holds
        self._watchers: list[Watcher] = []
        self._lock = threading.Lock()  # (writers and watchers; readers take ``state`` as it is)

    @property
    def term(self) -> int:
        return self.state[0]

    def holds(self, term: int) -> bool:
        """Whether runs claimed in ``term`` are still surely this replica's."""
        current, until = self.state
        return term == current and self.clock() < until

    def renewed(self, sent_at: float, *, fresh: bool) -> None:
        """A write of the lease that began at ``sent_at`` (this clock) succeeded; ``fresh``: it
        registered the replica anew (a new term)."""
        with self._lock:
            term = self.state[0] + 1 if fresh else self.state[0]
            self._set(term, sent_at + self.lease - self.margin)

    def ended(self) -> None:
        """The replica left: no run of any term starts here any more."""
        with self._lock:
            self._set(self.state[0], -math.inf)

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher`` now and at each change (on the thread that changed it); returns what
        stops it."""
        with self._lock:
            self._watchers.append(watcher)
            watcher(self.state[0], self.state[1] - self.clock())

        def unwatch() -> None:
            with self._lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)

        return unwatch

    def _set(self, term: int, until: float) -> None:
        self.state = (term, until)
        left = until - self.clock()
        for watcher in list(self._watchers):
            try:
                watcher(term, left)
            except Exception:  # a watcher's bug is its own: the lease was renewed
                logger.exception("corral lease watcher %r failed", watcher)
