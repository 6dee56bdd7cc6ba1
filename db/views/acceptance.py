"""What the acceptance rule (farmesh/billing/acceptance.py) needs from the database for a batch of outcomes: the
reservation the gateway made for each request, the outcome the OTHER consumer group already recorded for it (the
ledger's is on the reservation, settlement_txn; the payments group's in far_payment_sessions; a group's own earlier
choice needs no reading: its recording keeps the first outcome of a request), which of the accounts named are client
accounts, and which request already owns each contribution id in the consumer's own contributions table.

The reservations are read first, locked (in request id order, so two consumers never wait on each other in a
cycle), and the rest in a second statement: under READ COMMITTED that statement sees whatever a consumer that held
one of those rows committed before letting go of it. So whichever group records a request's winner first, the other
sees that winner when it judges the same request, even when both judge it at the same moment; and an operator's
release (an UPDATE of the row) waits for both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence
from uuid import UUID

import asyncpg

from db.views.reservations import COLUMNS, Reservation
from schemas.events import SessionOutcome

# The ledger takes the lock it will update the rows with (no upgrade later: no lock cycle with the payments group's
# share locks); the payments group and a replay only read.
Lock = Literal["FOR NO KEY UPDATE", "FOR SHARE"]


@dataclass
class Facts:
    """The database's side of the acceptance rule, for one batch."""

    reservations: dict[str, Reservation] = field(default_factory=dict)  # request id -> the gateway's reservation
    # request id -> the outcomes (event ids) a consumer group already recorded as the request's winner: the
    # ledger's settlement (far_reservations.settlement_txn) or the payments group's choice (far_payment_sessions).
    # Normally at most one.
    taken: dict[str, set[UUID]] = field(default_factory=dict)
    clients: set[UUID] = field(default_factory=set)  # the client accounts among those the outcomes name
    owners: dict[UUID, str] = field(default_factory=dict)  # contribution id -> its request, in the consumer's table


_FACTS = """
SELECT 'client' AS fact, NULL AS request_id, account_id AS id FROM far_accounts
    WHERE kind = 'client' AND account_id = ANY($1::uuid[])
UNION ALL SELECT 'owned', request_id, {id_column} FROM {contributions_table} WHERE {id_column} = ANY($2::uuid[])
"""
_PAYMENTS_WINNERS = "\nUNION ALL SELECT 'taken', request_id, event_id FROM far_payment_sessions WHERE request_id = ANY($3::text[])"


async def acceptance_facts(conn: asyncpg.Connection, outcomes: Sequence[SessionOutcome], contributions_table: str,
                           id_column: str, lock: Lock, *, read_payments_winners: bool) -> Facts:
    """The facts the rule judges `outcomes` on, read inside the caller's transaction (two round trips: the locked
    reservations, then the rest). `read_payments_winners`: the ledger's reading (the payments group reads the
    ledger's winners on the reservations themselves)."""
    facts = Facts()
    if not outcomes:
        return facts
    request_ids = sorted({o.request_id for o in outcomes})
    for row in await conn.fetch(f"SELECT {COLUMNS} FROM far_reservations WHERE request_id = ANY($1::text[]) "
                                f"ORDER BY request_id {lock}", request_ids):
        r = facts.reservations[row["request_id"]] = Reservation.of(row)
        if r.settlement_txn is not None:
            facts.taken.setdefault(r.request_id, set()).add(r.settlement_txn)
    query = _FACTS.format(id_column=id_column, contributions_table=contributions_table)
    args: list = [list({o.account_id for o in outcomes}), [c.contribution_id for o in outcomes for c in o.contributions]]
    if read_payments_winners:
        query, args = query + _PAYMENTS_WINNERS, [*args, request_ids]
    rows = await conn.fetch(query, *args)
    for row in rows:
        if row["fact"] == "taken":
            facts.taken.setdefault(row["request_id"], set()).add(row["id"])
        elif row["fact"] == "client":
            facts.clients.add(row["id"])
        else:
            facts.owners[row["id"]] = row["request_id"]
    return facts
