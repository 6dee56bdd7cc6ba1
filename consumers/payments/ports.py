"""What the payments group's handler and its weekly close need from the outside world (cosmicpython's ports).

The handler (consumers/payments/consumer.py) hands a consumer batch's outcomes to a `PayableStore` and
dead-letters what it rejected; the weekly close (consumers/payments/schedule.py) asks `WeeklyBatches` which week
closed last and to close the next ones (and publishes each closed batch through the group's declared publisher).
The PostgreSQL adapter of both ports is consumers/payments/repository.py (`PostgresPayments`); the unit tests
use in-memory ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Protocol, Sequence

from schemas.events import PaymentBatchClosed, SessionOutcome


@dataclass(frozen=True)
class Recorded:
    """What one batch made payable."""
    sessions: int
    items: int
    duplicates: int


@dataclass(frozen=True)
class Payable:
    """A batch judged and recorded: why each rejected outcome (by its index in the batch) is not paid, and what the
    accepted ones recorded."""
    recorded: Recorded
    rejected: dict[int, str] = field(default_factory=dict)


@dataclass
class Closed:
    """What closing a week did."""
    event: PaymentBatchClosed
    created: bool  # False: the week was already closed, this is the same batch
    carried: list[tuple[str, Decimal, int]] = field(default_factory=list)     # wallet, amount, items
    no_wallet: list[tuple[str, Decimal, int]] = field(default_factory=list)   # peer_id, amount, items
    seconds: float = 0.0


class PayableStore(Protocol):
    """The payable work, as the payments group's handler sees it."""

    async def record_payable(self, outcomes: Sequence[SessionOutcome]) -> Payable:
        """In ONE transaction: judge the outcomes with the ledger's acceptance rule (farmesh/billing/acceptance.py)
        against what is already payable, and record the payable work of the accepted ones (the first outcome of a
        request wins, as in the ledger, so the group pays exactly the work the ledger credits)."""
        ...


class WeeklyBatches(Protocol):
    """The weekly payment batches, as the scheduled close sees them."""

    async def last_closed(self) -> str | None:
        """The latest closed ISO week (None before the first close)."""
        ...

    async def close(self, week: str, min_payout: int, *, now: datetime | None = None) -> Closed:
        """Close `week` (idempotent: a closed week returns its batch unchanged)."""
        ...
