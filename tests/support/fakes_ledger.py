"""An in-memory `LedgerStore` (consumers/ledger/ports.py) for the ledger handler's unit tests.

It keeps the adapter's contract, not its SQL: the acceptance rule (the real, pure farmesh/billing/acceptance.py)
judged on the facts it holds (client accounts, the gateway's reservations, the winners recorded, contribution
ids), then the first accepted outcome of a request wins and a later one is a duplicate; recording an outcome closes
its request's reservation (settled, or released for a failed one), as the ledger does.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from uuid import UUID

from consumers.ledger.ports import Recorded, Settled
from db.views.acceptance import Facts
from db.views.reservations import Reservation
from farmesh.billing.acceptance import judge
from schemas.events import InferenceCompleted, SessionOutcome


class FakeLedger:
    def __init__(self, clients: Iterable[UUID] = (), reservations: Iterable[Reservation] = ()) -> None:
        self.clients = set(clients)                   # the known client accounts
        self.reservations = {r.request_id: r for r in reservations}  # what the gateway reserved, by request
        self.sessions: dict[str, SessionOutcome] = {}  # request_id -> the outcome recorded for it
        self.owners: dict[UUID, str] = {}             # contribution_id -> its request, as recorded
        self.batches: list[list[SessionOutcome]] = []  # what each settle() was given
        self.fail: Exception | None = None            # raised by the next settle() (a database that is away)

    def reserve(self, *reservations: Reservation) -> None:
        self.reservations.update({r.request_id: r for r in reservations})

    async def settle(self, outcomes: Sequence[SessionOutcome]) -> Settled:
        self.batches.append(list(outcomes))
        if self.fail is not None:
            raise self.fail
        verdict = judge(outcomes, Facts(dict(self.reservations), {rid: {o.event_id} for rid, o in self.sessions.items()},
                                        set(self.clients), dict(self.owners)))
        new = [o for o in verdict.accepted(outcomes) if o.request_id not in self.sessions
               and self.sessions.setdefault(o.request_id, o) is o]
        for o in new:
            self.owners.update({c.contribution_id: o.request_id for c in o.contributions})
            self.reservations[o.request_id] = dataclasses.replace(
                self.reservations[o.request_id], settlement_txn=o.event_id,
                status="settled" if isinstance(o, InferenceCompleted) else "released")
        settled = sum(isinstance(o, InferenceCompleted) for o in new)
        recorded = Recorded(len(new), sum(len(o.contributions) for o in new), len(outcomes) - len(verdict.rejected) - len(new),
                            settled, len(new) - settled, tuple(c for o in new for c in o.contributions))
        return Settled(recorded, verdict.rejected)
