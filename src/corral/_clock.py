"""The clock leases are measured on: seconds that go on while the machine is suspended.

``CLOCK_BOOTTIME`` where there is one (Linux): unlike ``CLOCK_MONOTONIC``, it counts the time
the machine spent suspended, as the wall clocks of other machines do. Elsewhere
``time.monotonic()``. Every process of the machine reads the same value (standard library only:
workers import it).
"""

from __future__ import annotations

import time

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def lease_clock() -> float:
    """Seconds on the machine's lease clock (see the module)."""
    if _BOOTTIME is not None:
        return time.clock_gettime(_BOOTTIME)
    return time.monotonic()
