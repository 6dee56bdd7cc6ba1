"""PostgreSQL adapter of the session ledger (asyncpg, set-based writes per consumer batch).

Per consumer batch, in ONE database transaction: the sessions (the first outcome of a request_id wins),
their contributions, and for each newly recorded session its settlement, a balanced posting keyed by the
outcome's event id:

    debit  client account    cost        (delivered tokens x price)
    credit node account      earnings    (one entry per contribution, keyed by its id)
    credit platform account  fee

and the request's reservation is closed (settled; released when the session failed: only delivered tokens
are charged), its key's rate counter corrected from max_tokens to the tokens delivered (migration 009). A redelivered or replayed event records and posts nothing.

`PostgresLedger` is the adapter of the handler's port (consumers/ledger/ports.py `LedgerStore`): `settle` judges a
batch with the acceptance rule (farmesh/billing/acceptance.py: the money adds up, and the outcome matches the
reservation the gateway made for its request) on the facts of this database, and records the accepted outcomes, in
the same transaction. The reservations judged on stay locked until the commit (db/views/acceptance.py), so the
payments group, judging the same requests, sees what this batch decided. `record_outcomes` records without judging
(the tests of the writes use it).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any, Sequence

import asyncpg

from consumers.ledger.ports import Recorded, Settled
from db.views.acceptance import acceptance_facts
from farmesh.billing import accounts
from farmesh.billing.acceptance import judge
from schemas.events import Contribution, InferenceCompleted, SessionOutcome

# Per batch, the outcomes and their contributions are COPYed into two temporary staging tables (one pair per
# connection, emptied at each commit), then ONE statement writes everything from them: COPY's binary rows
# instead of per-element array parameters, and a few round trips per batch (BEGIN with the staging tables, two
# COPYs, the statement, COMMIT) instead of one per table. The statement's data-modifying CTEs all run to
# completion; the foreign keys are checked at its end, when every CTE's rows exist. (Two tables, not one with
# a kind column: the planner sizes a never-analyzed temporary table by its pages, so joins on them are hashed;
# a filter on a kind column would be guessed at one row and nested.)
_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS far_ledger_stage_sessions (
    ord INT NOT NULL, event_id UUID NOT NULL, request_id TEXT NOT NULL, model TEXT NOT NULL, status TEXT NOT NULL,
    prompt_tokens INT, completion_tokens INT, completion TEXT, finish_reason TEXT, error TEXT, price_per_token NUMERIC,
    cost NUMERIC, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ, worker TEXT, account_id UUID, platform_fee NUMERIC,
    description TEXT, reservation_status TEXT, reservation_reason TEXT
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS far_ledger_stage_contributions (
    ord INT NOT NULL, event_id UUID NOT NULL, request_id TEXT NOT NULL, model TEXT NOT NULL, contribution_id UUID,
    peer_id TEXT, node_account UUID, start_block INT, end_block INT, tokens_processed INT, earnings NUMERIC,
    occurred_at TIMESTAMPTZ
) ON COMMIT DELETE ROWS;
"""
_SESSION_COLUMNS = ("ord", "event_id", "request_id", "model", "status", "prompt_tokens", "completion_tokens",
                    "completion", "finish_reason", "error", "price_per_token", "cost", "started_at", "finished_at",
                    "worker", "account_id", "platform_fee", "description", "reservation_status", "reservation_reason")
_CONTRIBUTION_COLUMNS = ("ord", "event_id", "request_id", "model", "contribution_id", "peer_id", "node_account",
                         "start_block", "end_block", "tokens_processed", "earnings", "occurred_at")

# s: the sessions recorded now (the first outcome of a request_id wins; ON CONFLICT: a later one records
# nothing). c: their contributions, with the wallet the registry knows for the peer when the work is recorded.
# a: the nodes' accounts. t: each new session's settlement transaction, keyed by the outcome's event id;
# e: its balanced entries (debit client cost, credit each node its earnings, credit the platform its fee;
# zero amounts left out); r: the request's reservation closed (settled, or released for a failed session).
_RECORD = """
WITH s AS (
    INSERT INTO far_mesh_sessions (request_id, event_id, model, status, prompt_tokens, completion_tokens,
        completion, finish_reason, error, price_per_token, cost, started_at, finished_at, worker, account_id,
        platform_fee)
    SELECT request_id, event_id, model, status, prompt_tokens, completion_tokens, completion, finish_reason, error,
        price_per_token, cost, started_at, finished_at, worker, account_id, platform_fee
    FROM pg_temp.far_ledger_stage_sessions ORDER BY ord
    ON CONFLICT (request_id) DO NOTHING
    RETURNING event_id
), c AS (
    INSERT INTO far_session_contributions (event_id, request_id, model, peer_id, wallet, start_block, end_block,
        tokens_processed, earnings, occurred_at)
    SELECT c.contribution_id, c.request_id, c.model, c.peer_id, n.wallet, c.start_block, c.end_block,
        c.tokens_processed, c.earnings, c.occurred_at
    FROM pg_temp.far_ledger_stage_contributions c JOIN s ON s.event_id = c.event_id
    LEFT JOIN far_nodes n ON n.peer_id = c.peer_id
    ORDER BY c.ord
    ON CONFLICT (event_id) DO NOTHING
    RETURNING 1
), a AS (
    INSERT INTO far_accounts (account_id, kind, name, peer_id)
    SELECT DISTINCT c.node_account, 'node', 'node ' || c.peer_id, c.peer_id
    FROM pg_temp.far_ledger_stage_contributions c JOIN s ON s.event_id = c.event_id
    ON CONFLICT DO NOTHING
), t AS (
    INSERT INTO far_ledger_transactions (txn_id, kind, request_id, description, occurred_at)
    SELECT o.event_id, 'settlement', o.request_id, o.description, o.finished_at
    FROM pg_temp.far_ledger_stage_sessions o JOIN s ON s.event_id = o.event_id
    ORDER BY o.ord
    ON CONFLICT DO NOTHING
    RETURNING txn_id
), posted AS MATERIALIZED (
    SELECT o.* FROM pg_temp.far_ledger_stage_sessions o JOIN t ON t.txn_id = o.event_id
), e AS (
    INSERT INTO far_ledger_entries (txn_id, account_id, side, amount, contribution_id)
    SELECT txn_id, account_id, side, amount, contribution_id FROM (
        SELECT p.ord, 0::bigint AS k, p.event_id AS txn_id, p.account_id, 'debit' AS side, p.cost AS amount,
            NULL::uuid AS contribution_id
        FROM posted p WHERE p.cost > 0
        UNION ALL
        SELECT p.ord, 1 + c.ord::bigint, p.event_id, c.node_account, 'credit', c.earnings, c.contribution_id
        FROM posted p JOIN pg_temp.far_ledger_stage_contributions c ON c.event_id = p.event_id
        WHERE c.earnings > 0
        UNION ALL
        SELECT p.ord, 9223372036854775807, p.event_id, $1::uuid, 'credit', p.platform_fee, NULL
        FROM posted p WHERE p.platform_fee > 0
    ) entries ORDER BY ord, k
), r AS (
    UPDATE far_reservations r
    SET status = p.reservation_status, charged = p.cost, settlement_txn = p.event_id, closed_at = now(),
        reason = p.reservation_reason
    FROM posted p
    -- ANY(ARRAY(...)): the reservations are found by their primary key, never by a scan of the table
    WHERE r.request_id = ANY(ARRAY(SELECT request_id FROM posted)) AND r.request_id = p.request_id
), k AS (
    -- rate counters: a limited key's minute counted max_tokens when the request was admitted; now that it is
    -- settled it counts the tokens delivered. Once per reservation: only a newly posted settlement of a reservation
    -- still open corrects (a released one gave its tokens back when it was released).
    UPDATE far_rate_counters rc SET tokens = GREATEST(0, rc.tokens - d.unused)
    FROM (SELECT fr.key_id, fr.rate_window,
                 sum(fr.max_tokens - LEAST(fr.max_tokens, GREATEST(COALESCE(p.completion_tokens, 0), 0))) AS unused
          FROM posted p JOIN far_reservations fr ON fr.request_id = p.request_id
          WHERE fr.rate_window IS NOT NULL AND fr.status = 'open'
          GROUP BY fr.key_id, fr.rate_window) d
    WHERE rc.key_id = d.key_id AND rc.window_start = d.rate_window
)
SELECT ARRAY(SELECT event_id FROM s) AS inserted, ARRAY(SELECT txn_id FROM t) AS posted,
       (SELECT count(*) FROM c) AS contributions
"""


def _staged_rows(outcomes: Sequence[SessionOutcome]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The staging rows of the outcomes and of their contributions, in batch order."""
    sessions: list[tuple[Any, ...]] = []
    contributions: list[tuple[Any, ...]] = []
    for n, o in enumerate(outcomes):
        completed = isinstance(o, InferenceCompleted)
        sessions.append((
            n, o.event_id, o.request_id, o.model, o.status, o.prompt_tokens, o.completion_tokens, o.completion,
            o.finish_reason if completed else None, None if completed else o.error,  # type: ignore[union-attr]
            o.price_per_token, o.cost_far, o.started_at, o.finished_at, o.worker, o.account_id, o.platform_fee_far,
            f"{o.type} {o.completion_tokens} tokens", "settled" if completed else "released",
            None if completed else f"session {o.status}: charged {o.completion_tokens} delivered tokens"))
        contributions += [(len(contributions) + i, o.event_id, o.request_id, o.model, c.contribution_id, c.peer_id,
                           accounts.node_account_id(c.peer_id), c.start_block, c.end_block, c.tokens_processed,
                           c.earnings_far, o.finished_at)
                          for i, c in enumerate(o.contributions)]
    return sessions, contributions


class PostgresLedger:
    """The ledger group's `LedgerStore` on a connection pool: one connection and one transaction per batch."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def settle(self, outcomes: Sequence[SessionOutcome]) -> Settled:
        async with self.pool.acquire() as conn:
            return await settle(conn, outcomes)


async def settle(conn: asyncpg.Connection, outcomes: Sequence[SessionOutcome]) -> Settled:
    """Judge a batch (money, client account, the request's reservation, the pricing rule's split, contribution ids
    already owned) and record the accepted outcomes, in one transaction: the acceptance facts are read where the
    writes go. An acceptable outcome that loses to the winner already recorded counts as a duplicate."""
    if not outcomes:
        return Settled(Recorded(0, 0, 0))
    async with _transaction(conn):
        facts = await acceptance_facts(conn, outcomes, "far_session_contributions", "event_id", "FOR NO KEY UPDATE",
                                       read_payments_winners=True)
        verdict = judge(outcomes, facts)
        recorded = await _record(conn, verdict.accepted(outcomes))
    if verdict.losers:
        recorded = dataclasses.replace(recorded, duplicates=recorded.duplicates + len(verdict.losers))
    return Settled(recorded, verdict.rejected)


async def record_outcomes(conn: asyncpg.Connection, outcomes: Sequence[SessionOutcome]) -> Recorded:
    """Record sessions with their contributions, settlements and closed reservations in one transaction.

    The first outcome of a request wins; a later one (a redelivered request that ran again, or a
    replayed event) records nothing, so the ledger never changes on redelivery.
    """
    if not outcomes:
        return Recorded(0, 0, 0)
    async with _transaction(conn):
        return await _record(conn, outcomes)


async def _record(conn: asyncpg.Connection, outcomes: Sequence[SessionOutcome]) -> Recorded:
    """record_outcomes' writes, inside the caller's `_transaction` (its staging tables)."""
    if not outcomes:
        return Recorded(0, 0, 0)
    # The same event delivered twice in one batch is staged once (its copies would win together).
    staged = list({(o.event_id, o.request_id): o for o in reversed(outcomes)}.values())[::-1]
    sessions, contributions = _staged_rows(staged)
    await conn.copy_records_to_table("far_ledger_stage_sessions", schema_name="pg_temp", records=sessions,
                                     columns=_SESSION_COLUMNS)
    if contributions:
        await conn.copy_records_to_table("far_ledger_stage_contributions", schema_name="pg_temp",
                                         records=contributions, columns=_CONTRIBUTION_COLUMNS)
    result = await conn.fetchrow(_RECORD, accounts.PLATFORM_ACCOUNT)
    inserted, posted = set(result["inserted"]), set(result["posted"])
    winners = [o for o in staged if o.event_id in inserted]
    settled = sum(1 for o in winners if o.event_id in posted and isinstance(o, InferenceCompleted))
    released = sum(1 for o in winners if o.event_id in posted) - settled
    return Recorded(len(inserted), result["contributions"], len(outcomes) - len(inserted), settled, released,
                    _credited(winners, posted))


@contextlib.asynccontextmanager
async def _transaction(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A transaction with the staging tables: BEGIN and CREATE ... IF NOT EXISTS in one round trip."""
    if conn.is_in_transaction():  # the caller's transaction: a savepoint, as conn.transaction() nests
        async with conn.transaction():
            await conn.execute(_STAGE)
            yield
        return
    await conn.execute("BEGIN;" + _STAGE)
    try:
        yield
    except BaseException:
        if not conn.is_closed() and conn.is_in_transaction():
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


def _credited(winners: Sequence[SessionOutcome], posted: set[Any]) -> tuple[Contribution, ...]:
    """The contributions of the outcomes whose settlement this batch posted."""
    return tuple(c for o in winners if o.event_id in posted for c in o.contributions)
