"""An in-memory `PayableStore` and `WeeklyBatches` (consumers/payments/ports.py) for the payments unit tests.

They keep the adapter's contract, not its SQL: the acceptance rule (the real, pure farmesh/billing/acceptance.py)
judged on the facts held here (client accounts, the gateway's reservations, the winners recorded, contribution ids),
the first accepted outcome of a request wins; a week closes once (closing it again
returns the same batch) and in order, its lines paying each wallet's open work of that week or earlier. (The
minimum payout and the carry-over are the adapter's, tested on PostgreSQL: here every wallet is paid.)
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from uuid import UUID

from consumers.payments.ports import Closed, Payable, Recorded
from consumers.payments.repository import PaymentsError, iso_week
from db.views.acceptance import Facts
from db.views.reservations import Reservation
from farmesh.billing.acceptance import judge
from schemas import money
from schemas.events import PaymentBatchClosed, PaymentLine, SessionOutcome


class FakePayments:
    def __init__(self, clients: Iterable[UUID] = (), wallets: Mapping[str, str] | None = None,
                 reservations: Iterable[Reservation] = ()) -> None:
        self.clients = set(clients)                        # the known client accounts
        self.reservations = {r.request_id: r for r in reservations}  # what the gateway reserved, by request
        self.wallets = dict(wallets or {})                 # peer_id -> payout wallet, as the registry knows it
        self.sessions: dict[str, SessionOutcome] = {}      # request_id -> the outcome paid for it
        self.items: dict[UUID, tuple[str, str, Decimal, str]] = {}  # contribution_id -> request, peer, amount, week
        self.paid: set[UUID] = set()                        # items in a closed line
        self.weeks: dict[str, PaymentBatchClosed] = {}     # the closed weeks' batches
        self.batches: list[list[SessionOutcome]] = []       # what each record_payable() was given
        self.fail: Exception | None = None                 # raised by the next record_payable()

    def reserve(self, *reservations: Reservation) -> None:
        self.reservations.update({r.request_id: r for r in reservations})

    async def record_payable(self, outcomes: Sequence[SessionOutcome]) -> Payable:
        self.batches.append(list(outcomes))
        if self.fail is not None:
            raise self.fail
        owners = {cid: request for cid, (request, *_) in self.items.items()}
        verdict = judge(outcomes, Facts(dict(self.reservations), {rid: {o.event_id} for rid, o in self.sessions.items()},
                                        set(self.clients), owners))
        rejected = verdict.rejected
        new = [o for o in verdict.accepted(outcomes) if o.request_id not in self.sessions
               and self.sessions.setdefault(o.request_id, o) is o]
        for o in new:
            self.items.update({c.contribution_id: (o.request_id, c.peer_id, c.earnings_far, iso_week(o.finished_at))
                               for c in o.contributions})
        recorded = Recorded(len(new), sum(len(o.contributions) for o in new), len(outcomes) - len(rejected) - len(new))
        return Payable(recorded, rejected)

    async def last_closed(self) -> str | None:
        return max(self.weeks, default=None)

    async def close(self, week: str, min_payout: int, *, now: datetime | None = None) -> Closed:
        if week in self.weeks:
            return Closed(self.weeks[week], False)
        if self.weeks and max(self.weeks) > week:
            raise PaymentsError(f"weeks close in order: {week} is before {max(self.weeks)}")
        owed: dict[str, list[UUID]] = {}
        unpaid = Decimal(0)
        for cid, (_, peer, amount, item_week) in sorted(self.items.items(), key=lambda kv: str(kv[0])):
            if item_week <= week and cid not in self.paid and amount > 0:
                if peer in self.wallets:
                    owed.setdefault(self.wallets[peer], []).append(cid)
                else:
                    unpaid += amount
        lines = [PaymentLine(line_id=len(self.paid) + n + 1, wallet=wallet, contributions=len(ids),
                             amount_far=sum(self.items[c][2] for c in ids))
                 for n, (wallet, ids) in enumerate(sorted(owed.items()))]
        self.paid.update(c for ids in owed.values() for c in ids)
        closed_at = now or datetime.now(timezone.utc)
        self.weeks[week] = PaymentBatchClosed(
            occurred_at=closed_at, week=week, min_payout_far=money.to_far(min_payout), lines=lines,
            total_far=sum((line.amount_far for line in lines), Decimal(0)), carried_over_far=Decimal(0),
            unpaid_no_wallet_far=unpaid, closed_at=closed_at)
        return Closed(self.weeks[week], True)
