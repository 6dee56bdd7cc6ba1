"""An in-memory `LedgerStore` (consumers/ledger/ports.py) for the ledger handler's unit tests.

It keeps the adapter's contract, not its SQL: the acceptance rule (the real, pure farmesh/billing/acceptance.py)
judged on the facts it holds, then the first accepted outcome of a request wins and a later one is a duplicate.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from uuid import UUID

from consumers.ledger.ports import Recorded, Settled
from farmesh.billing.acceptance import reasons_for
from schemas.events import InferenceCompleted, SessionOutcome


class FakeLedger:
    def __init__(self, clients: Iterable[UUID] = ()) -> None:
        self.clients = set(clients)                   # the known client accounts
        self.sessions: dict[str, SessionOutcome] = {}  # request_id -> the outcome recorded for it
        self.owners: dict[UUID, str] = {}             # contribution_id -> its request, as recorded
        self.batches: list[list[SessionOutcome]] = []  # what each settle() was given
        self.fail: Exception | None = None            # raised by the next settle() (a database that is away)

    async def settle(self, outcomes: Sequence[SessionOutcome]) -> Settled:
        self.batches.append(list(outcomes))
        if self.fail is not None:
            raise self.fail
        rejected = reasons_for(outcomes, self.clients, dict(self.owners))
        new = [o for i, o in enumerate(outcomes) if i not in rejected and o.request_id not in self.sessions
               and self.sessions.setdefault(o.request_id, o) is o]
        for o in new:
            self.owners.update({c.contribution_id: o.request_id for c in o.contributions})
        settled = sum(isinstance(o, InferenceCompleted) for o in new)
        recorded = Recorded(len(new), sum(len(o.contributions) for o in new), len(outcomes) - len(rejected) - len(new),
                            settled, len(new) - settled, tuple(c for o in new for c in o.contributions))
        return Settled(recorded, rejected)
