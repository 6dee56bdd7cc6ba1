"""What the acceptance rule (farmesh/billing/acceptance.py) needs from the database: which accounts named by a
batch of outcomes are client accounts, and which request already owns each of their contribution ids."""
from __future__ import annotations

from typing import Sequence
from uuid import UUID

import asyncpg

from schemas.events import SessionOutcome


async def acceptance_facts(conn: asyncpg.Connection | asyncpg.Pool, outcomes: Sequence[SessionOutcome],
                           contributions_table: str, id_column: str) -> tuple[set[UUID], dict[UUID, str]]:
    """(the client accounts among those the outcomes name, the owner request of each of their contribution ids
    in the consumer's own contributions table): the arguments of acceptance.reasons_for()."""
    if not outcomes:
        return set(), {}
    ids = [c.contribution_id for o in outcomes for c in o.contributions]
    # One round trip: the owners of the contribution ids, then the known clients among the accounts named.
    rows = await conn.fetch(
        f"SELECT true AS owned, {id_column} AS id, request_id FROM {contributions_table} WHERE {id_column} = ANY($1::uuid[]) "
        "UNION ALL SELECT false, account_id, NULL FROM far_accounts WHERE kind = 'client' AND account_id = ANY($2::uuid[])",
        ids, list({o.account_id for o in outcomes}))
    owners = {r["id"]: r["request_id"] for r in rows if r["owned"]}
    return {r["id"] for r in rows if not r["owned"]}, owners
