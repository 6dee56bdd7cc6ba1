"""Helpers for the money tests: an isolated mesh (own broker, own database), scripted sessions, the CLI."""
from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import asyncpg
from click.testing import CliRunner, Result
from faststream.kafka import KafkaBroker
from prometheus_client import CollectorRegistry

from consumers.ledger.audit import audit
from farmesh.billing import accounts
from farmesh.kafka import messaging
from schemas import money
from consumers.inference.generation import SpanWork
from farmesh.billing.pricing import Work, fee_rate_units, settlement
from db.views.reservations import Reservation
from schemas.events import Contribution, InferenceCompleted, InferenceFailed, InferenceRequested, SessionOutcome


@dataclass
class MoneyEnv:
    """A broker (FARMESH_TEST_BROKER's kind) and a migrated database of its own: the audit and the replay see only
    what the test did (the session-wide broker and database are shared with every other test)."""

    bootstrap: str
    database_url: str
    pool: asyncpg.Pool


@contextlib.asynccontextmanager
async def money_env(tmp: Path, admin_url: str) -> AsyncIterator[MoneyEnv]:
    from db.scratch import scratch_database
    from tests.support.kafka import start_test_broker

    broker = await asyncio.to_thread(start_test_broker, tmp / "kafka")
    try:
        async with scratch_database(admin_url, "farmesh_money") as url:
            await messaging.ensure_topics(broker.bootstrap, messaging.mesh_topics(3))
            pool = await asyncpg.create_pool(url, min_size=1, max_size=6)
            try:
                yield MoneyEnv(broker.bootstrap, url, pool)
            finally:
                await pool.close()
    finally:
        await asyncio.to_thread(broker.stop)


async def producer(bootstrap: str) -> KafkaBroker:
    broker = messaging.create_broker(bootstrap, f"test-{uuid.uuid4().hex[:6]}", CollectorRegistry())
    await broker.connect()
    return broker


async def audit_breaks(pool: asyncpg.Pool) -> list[str]:
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        _, breaks = await audit(conn)
    return [str(b) for b in breaks]


# ------------------------------------------------------------------------------------------------ sessions

PEERS = ("QmPeerAlpha", "QmPeerBeta", "QmPeerGamma")


def routes(i: int) -> list[tuple[str, int, int]]:
    """A route through the 4 blocks for session i: two or three nodes, spans of different sizes."""
    if i % 3 == 0:
        return [(PEERS[0], 0, 2), (PEERS[1], 2, 4)]
    if i % 3 == 1:
        return [(PEERS[0], 0, 1), (PEERS[1], 1, 3), (PEERS[2], 3, 4)]
    return [(PEERS[2], 0, 3), (PEERS[1], 3, 4)]


@dataclass
class ScriptedResult:
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    spans: list[SpanWork]


class Broke(RuntimeError):
    def __init__(self, partial: ScriptedResult) -> None:
        super().__init__("node died mid-generation")
        self.partial = partial


@dataclass
class ScriptedGenerator:
    """Deterministic sessions from the prompt `session <i>`: 1..7 tokens, varied routes, every 10th
    session (i % 10 == 3) breaks after i % 3 tokens (delivered tokens only are charged)."""

    calls: list[str] = field(default_factory=list)

    def generate_stream(self, prompt: str, max_new_tokens: int, on_token: Any, sampling: Any = None,
                        seed_key: str = "") -> ScriptedResult:
        self.calls.append(prompt)
        i = int(prompt.split()[-1]) if prompt.split()[-1].isdigit() else len(prompt)
        n = min(1 + i % 7, max_new_tokens)
        fails = i % 10 == 3
        if fails:
            n = min(n, i % 3)
        for k in range(n):
            on_token(k, 100 + k, f"t{k} ")
        prompt_tokens = 4 + i % 5
        processed = prompt_tokens + max(n - 1, 0)
        spans = [SpanWork(p, a, b, processed) for p, a, b in routes(i)]
        result = ScriptedResult(prompt_tokens, [100 + k for k in range(n)], "".join(f"t{k} " for k in range(n)),
                                "length", spans)
        if fails:
            raise Broke(result)
        return result


def outcome(request_id: str, account_id: uuid.UUID, tokens: int, finished_at: datetime, *, i: int = 0,
            price: Decimal = Decimal("0.0001"), fee: Decimal = Decimal(0), failed: bool = False,
            peers: Sequence[tuple[str, int, int]] | None = None) -> SessionOutcome:
    """A session outcome whose money adds up exactly (as the worker computes it)."""
    spans = [Work(p, a, b, 5 + tokens) for p, a, b in (peers or routes(i))]
    s = settlement(tokens, money.to_base_units(price), fee_rate_units(fee), spans)
    contributions = [Contribution(contribution_id=uuid.uuid4(), peer_id=w.peer_id, start_block=w.start_block,
                                  end_block=w.end_block, tokens_processed=w.tokens_processed,
                                  earnings_far=money.to_far(share)) for w, share in zip(spans, s.shares)]
    common = dict(request_id=request_id, model="tiny", account_id=account_id, prompt_tokens=5,
                  completion_tokens=tokens, completion="x" * tokens, price_per_token=price,
                  cost_far=money.to_far(s.debit), platform_fee_rate=fee, platform_fee_far=money.to_far(s.fee),
                  started_at=finished_at, finished_at=finished_at, worker="test", contributions=contributions)
    return InferenceFailed(error="boom", **common) if failed else InferenceCompleted(finish_reason="length", **common)


async def reserve_for(pool: asyncpg.Pool, key: str, o: SessionOutcome, max_tokens: int | None = None) -> None:
    """The gateway's reservation for an outcome the test publishes itself."""
    await accounts.reserve(pool, f"Bearer {key}", accounts.Reservation(
        o.request_id, o.model, max_tokens or max(10, o.completion_tokens), o.price_per_token, o.platform_fee_rate))


async def hold(pool: asyncpg.Pool | asyncpg.Connection, *outcomes: SessionOutcome, max_tokens: int | None = None) -> None:
    """The gateway's open reservation for each outcome's request, inserted as far_reserve inserts it (for an account
    a test made without an API key; with a key, `reserve_for` goes through the gateway's own path)."""
    rows = [(r.request_id, r.account_id, r.model, r.max_tokens, r.price_per_token, r.platform_fee_rate, r.amount)
            for r in (reservation_for(o, max_tokens) for o in outcomes)]
    await pool.executemany(
        "INSERT INTO far_reservations (request_id, account_id, model, max_tokens, price_per_token, platform_fee_rate, "
        "amount) VALUES ($1, $2, $3, $4, $5, $6, $7)", rows)


def reservation_for(o: SessionOutcome | InferenceRequested, max_tokens: int | None = None) -> Reservation:
    """The open reservation the gateway would have made for an outcome's (or a request's) request, as
    far_reservations holds it: for the in-memory ports of the unit tests."""
    tokens = max_tokens or (o.max_tokens if isinstance(o, InferenceRequested) else max(10, o.completion_tokens))
    return Reservation(o.request_id, o.account_id, o.model, tokens, o.price_per_token, o.platform_fee_rate,
                       money.to_far(tokens * money.to_base_units(o.price_per_token)), "open")


# ------------------------------------------------------------------------------------------------ CLI

async def farmesh(*args: str) -> Result:
    """`farmesh ARGS` in-process (in a thread: the commands run their own event loop)."""
    from farmesh.cli import cli
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), catch_exceptions=False)
