"""The run ledger: claims, leases and history in a database shared by every replica.

Knows nothing of asyncz or the pool; the scheduler drives it through a :class:`Coordinator`.
"""

from corral._ledger._coordinator import ClaimWithdrawn, Coordinator, LedgerStatistics
from corral._ledger._ledger import DEFAULT_LEASE, Ledger
from corral._ledger._records import (
    FINAL_STATUSES,
    RUN_STATUSES,
    Claim,
    ClaimResult,
    LostRun,
    ReplicaRecord,
    RunRecord,
    RunStatus,
)

__all__ = [
    "DEFAULT_LEASE",
    "FINAL_STATUSES",
    "RUN_STATUSES",
    "Claim",
    "ClaimResult",
    "ClaimWithdrawn",
    "Coordinator",
    "Ledger",
    "LedgerStatistics",
    "LostRun",
    "ReplicaRecord",
    "RunRecord",
    "RunStatus",
]
