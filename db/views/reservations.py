"""The gateway's reservations as the acceptance rule reads them (far_reservations, migrations 006/007).

A reservation is what the gateway held on a client's account before it published a request: who pays, for which
model, at which price and fee rate, for at most how many tokens. Every part that decides whether work counts reads
it here: the worker before it runs a request, the ledger, the payments group and a replay before they accept an
outcome (farmesh/billing/acceptance.py holds the rule). Nothing here writes: the gateway inserts a reservation, the
ledger closes it (farmesh/billing/accounts.py releases one the request of which never ran).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

# What the rule compares (the reservation's immutable terms) and how the reservation stands.
COLUMNS = ("request_id, account_id, model, max_tokens, price_per_token, platform_fee_rate, amount, status, "
           "settlement_txn, reason, reply_topic")


@dataclass(frozen=True)
class Reservation:
    """One far_reservations row: the terms the gateway fixed for a request, and its state."""

    request_id: str
    account_id: UUID
    model: str
    max_tokens: int
    price_per_token: Decimal
    platform_fee_rate: Decimal
    amount: Decimal  # max_tokens x price: the most the request may cost
    status: str  # open | settled | released
    settlement_txn: UUID | None = None  # the outcome (its event id) the ledger closed it with
    reason: str | None = None  # why it was released
    reply_topic: str | None = None  # where the gateway reads the request's tokens (None: not recorded, migration 010)

    @property
    def withdrawn(self) -> bool:
        """Released with no outcome: by an operator (`farmesh keys release`) or by the gateway when it could not
        queue the request. Released by a failed/cancelled/expired outcome is not withdrawn: that outcome closed it."""
        return self.status == "released" and self.settlement_txn is None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Reservation:
        return cls(row["request_id"], row["account_id"], row["model"], row["max_tokens"], row["price_per_token"],
                   row["platform_fee_rate"], row["amount"], row["status"], row["settlement_txn"], row["reason"],
                   row["reply_topic"])


async def reservation(conn: asyncpg.Connection | asyncpg.Pool, request_id: str) -> Reservation | None:
    """The reservation of one request (None: the gateway never reserved it)."""
    row = await conn.fetchrow(f"SELECT {COLUMNS} FROM far_reservations WHERE request_id = $1", request_id)
    return None if row is None else Reservation.of(row)


# Each reservation with the outcome the payments group recorded as its request's winner (the ledger's is the
# reservation's settlement_txn): one round trip.
_WITH_TAKEN = f"""
SELECT {COLUMNS}, p.event_id AS paid FROM far_reservations r LEFT JOIN far_payment_sessions p USING (request_id)
WHERE r.request_id = ANY($1::text[])
"""


async def reservations_with_taken(conn: asyncpg.Connection | asyncpg.Pool, request_ids: Collection[str]
                                  ) -> tuple[dict[str, Reservation], dict[str, set[UUID]]]:
    """(the reservations of `request_ids`, request id -> the outcomes a consumer group already recorded as its
    winner: the ledger's settlement, the payments group's choice): what a replay judges a chunk of the log on."""
    reservations: dict[str, Reservation] = {}
    taken: dict[str, set[UUID]] = {}
    if not request_ids:
        return reservations, taken
    for row in await conn.fetch(_WITH_TAKEN, list(request_ids)):
        r = reservations[row["request_id"]] = Reservation.of(row)
        won = {x for x in (r.settlement_txn, row["paid"]) if x is not None}
        if won:
            taken[r.request_id] = won
    return reservations, taken
