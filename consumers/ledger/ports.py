"""What the ledger group's handler needs from the outside world, and no more (cosmicpython's ports).

The handler (consumers/ledger/consumer.py) judges nothing and writes nothing itself: it hands a consumer batch's
session outcomes to a `LedgerStore`, then dead-letters what the store rejected and counts what it recorded.
The PostgreSQL adapter is consumers/ledger/repository.py (`PostgresLedger`); the unit tests use an in-memory one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from schemas.events import Contribution, SessionOutcome


@dataclass(frozen=True)
class Recorded:
    """What one batch wrote to the ledger."""
    sessions: int
    contributions: int
    duplicates: int
    settled: int = 0
    released: int = 0
    # The contributions whose node credit this batch posted (not those of duplicates): for per-node metrics.
    credited: tuple[Contribution, ...] = ()


@dataclass(frozen=True)
class Settled:
    """A batch judged and recorded: why each rejected outcome (by its index in the batch) was not settled, and
    what the accepted ones wrote."""
    recorded: Recorded
    rejected: dict[int, str] = field(default_factory=dict)


class LedgerStore(Protocol):
    """The session ledger, as the ledger group's handler sees it."""

    async def settle(self, outcomes: Sequence[SessionOutcome]) -> Settled:
        """In ONE transaction: judge the outcomes with the acceptance rule (farmesh/billing/acceptance.py) against
        what is already recorded, and record the accepted ones (the first outcome of a request wins; a redelivered
        or replayed one records nothing). Atomic so that the facts judged on are the facts written next to."""
        ...
