"""Accounts, API keys, deposits and reservations on PostgreSQL (asyncpg).

- A **client account** pays for generation; its API keys are stored only as SHA-256 hashes (a key is
  32 random bytes, so a fast hash is enough); the first characters (`prefix`) identify a key to people.
- A **node account** exists per peer id (its id is derived from the peer id, so every consumer and every
  replay names the same account); its payout wallet is the registry's (far_nodes.wallet).
- The **platform** account receives the platform fee; two **external** accounts stand for money coming
  in (`deposits`, debited when a client is credited) and going out (`payouts`, credited when a payment
  batch line is paid).

A balance is always the sum of the account's entries (credits - debits); nothing stores a balance.
What a client may still spend is its balance minus its open reservations.
"""
from __future__ import annotations

import functools
import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Sequence

import asyncpg

from farmesh.runtime.errors import Refused
from schemas import money

from farmesh.billing import pricing
PLATFORM_ACCOUNT = uuid.UUID("00000000-0000-4000-8000-000000000001")
DEPOSITS_ACCOUNT = uuid.UUID("00000000-0000-4000-8000-000000000002")
PAYOUTS_ACCOUNT = uuid.UUID("00000000-0000-4000-8000-000000000003")

_NODE_NAMESPACE = uuid.UUID("5f1f4a8e-6c0b-4f7e-9a53-2f8e0d3c7b11")
KEY_PREFIX = "fmk_"
PREFIX_LENGTH = 12  # "fmk_" + 8 characters of the key: enough to tell keys apart, useless to an attacker


@functools.lru_cache(maxsize=65536)
def node_account_id(peer_id: str) -> uuid.UUID:
    """The account of the node `peer_id`: deterministic, so the ledger, payments and replays agree."""
    return uuid.uuid5(_NODE_NAMESPACE, f"node:{peer_id}")


# --------------------------------------------------------------------------------------------- request ids

_ACCOUNT_SUFFIX = re.compile(r"\.[0-9a-f]{32}\Z")


def mesh_request_id(account_id: uuid.UUID, client_id: str) -> str:
    """The mesh's id of the request a client named `client_id`: `<client id>.<account id hex>`.

    Request ids are private to an account: the client chooses its id, the gateway scopes it by the account that
    asked, and the scoped id is what the whole mesh keys on (events and Kafka keys, far_reservations,
    far_mesh_sessions, `farmesh keys release`, reports). Deterministic, so every gateway maps the same account's
    repeat to the same request (idempotency across gateways); another account's identical id is simply another
    request, which it can neither see nor block. The client's id comes first (readable, `LIKE 'id%'` finds it);
    the suffix has a fixed length, so the mapping is one-to-one whatever the client's id contains.
    """
    return f"{client_id}.{account_id.hex}"


def client_request_id(mesh_id: str) -> str:
    """The client's id of a mesh request id (the inverse of mesh_request_id): what the APIs show their caller.
    An id without an account suffix (recorded before ids were scoped, or published by a test) is its own."""
    return mesh_id[:-33] if _ACCOUNT_SUFFIX.search(mesh_id) else mesh_id


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header (None when absent or of another scheme)."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


class AccountError(Refused):
    """An account operation that cannot be done (unknown key, name taken, ...)."""


class Unauthorized(AccountError):
    """Missing, unknown or revoked API key (HTTP 401)."""


class InsufficientFunds(AccountError):
    """The account cannot cover what the request may cost (HTTP 402)."""

    def __init__(self, required: int, available: int) -> None:
        super().__init__(f"this request may cost {money.text(money.to_far(required))} FAR; "
                         f"the account has {money.text(money.to_far(available))} FAR available")
        self.required = required
        self.available = available


class DuplicateRequest(AccountError):
    """The mesh request id names something no reservation of this account explains (HTTP 409): a session recorded
    without a reservation (before reservations existed). Another account's id never gets here: ids are scoped by
    account (mesh_request_id), so its id is another request."""


@dataclass(frozen=True)
class Client:
    account_id: uuid.UUID
    name: str
    key_id: uuid.UUID
    prefix: str


@dataclass(frozen=True)
class IssuedKey:
    key: str  # shown once, never stored
    key_id: uuid.UUID
    prefix: str
    account_id: uuid.UUID
    name: str


# --------------------------------------------------------------------------------------------- balances

# One statement, so the balance and the open reservations come from one snapshot even while the ledger
# settles (it inserts the debit and closes the reservation in one transaction).
_AVAILABLE = """
SELECT (SELECT COALESCE(sum(CASE WHEN side = 'credit' THEN amount ELSE -amount END), 0)
          FROM far_ledger_entries WHERE account_id = $1) AS balance,
       (SELECT COALESCE(sum(amount), 0) FROM far_reservations WHERE account_id = $1 AND status = 'open') AS reserved
"""


async def balance(conn: asyncpg.Connection | asyncpg.Pool, account_id: uuid.UUID) -> tuple[int, int]:
    """(balance, reserved) of an account, in base units."""
    row = await conn.fetchrow(_AVAILABLE, account_id)
    return units(row["balance"]), units(row["reserved"])


def units(far: Decimal) -> int:
    """Base units of a (possibly negative) NUMERIC amount."""
    return -money.to_base_units(-far) if far < 0 else money.to_base_units(far)


# --------------------------------------------------------------------------------------------- postings

async def post(conn: asyncpg.Connection, txn_id: uuid.UUID, kind: str, entries: Sequence[tuple[uuid.UUID, str, int]],
               *, description: str = "", occurred_at: datetime | None = None, request_id: str | None = None) -> bool:
    """Post balanced entries (account, 'debit'|'credit', base units) as one transaction keyed by txn_id.

    Returns False (and posts nothing) when txn_id was already posted. Zero amounts are left out.
    """
    debits = sum(a for _, side, a in entries if side == "debit")
    credits = sum(a for _, side, a in entries if side == "credit")
    if debits != credits or any(a < 0 for _, _, a in entries):
        raise ValueError(f"unbalanced posting {txn_id}: debits {debits} != credits {credits}")
    async with conn.transaction():
        inserted = await conn.fetchval(
            "INSERT INTO far_ledger_transactions (txn_id, kind, request_id, description, occurred_at) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (txn_id) DO NOTHING RETURNING txn_id",
            txn_id, kind, request_id, description, occurred_at or datetime.now(timezone.utc))
        if inserted is None:
            return False
        rows = [(txn_id, account, side, money.to_far(amount)) for account, side, amount in entries if amount]
        if rows:
            await conn.executemany(
                "INSERT INTO far_ledger_entries (txn_id, account_id, side, amount) VALUES ($1, $2, $3, $4)", rows)
    return True


async def deposit(conn: asyncpg.Connection, account_id: uuid.UUID, amount: int, *,
                  txn_id: uuid.UUID | None = None, description: str = "credit") -> uuid.UUID:
    """Credit a client account (debit the external deposits account)."""
    if amount <= 0:
        raise AccountError("a credit must be a positive amount")
    kind = await conn.fetchval("SELECT kind FROM far_accounts WHERE account_id = $1", account_id)
    if kind != "client":
        raise AccountError(f"{account_id} is not a client account")
    txn_id = txn_id or uuid.uuid4()
    await post(conn, txn_id, "deposit", [(DEPOSITS_ACCOUNT, "debit", amount), (account_id, "credit", amount)],
               description=description)
    return txn_id


# --------------------------------------------------------------------------------------------- keys

async def _issue_key(conn: asyncpg.Connection, account_id: uuid.UUID, name: str) -> IssuedKey:
    for _ in range(5):
        key = new_key()
        key_id, prefix = uuid.uuid4(), key[:PREFIX_LENGTH]
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO far_api_keys (key_id, account_id, prefix, key_hash) VALUES ($1, $2, $3, $4)",
                    key_id, account_id, prefix, hash_key(key))
        except asyncpg.UniqueViolationError:
            continue  # a prefix collision (2^-48): draw again
        return IssuedKey(key, key_id, prefix, account_id, name)
    raise AccountError("could not draw a unique API key")


async def create_client(conn: asyncpg.Connection, name: str, credit: int = 0) -> IssuedKey:
    """A new client account named `name` with one API key and an optional opening credit."""
    async with conn.transaction():
        account_id = uuid.uuid4()
        try:
            await conn.execute("INSERT INTO far_accounts (account_id, kind, name) VALUES ($1, 'client', $2)",
                               account_id, name)
        except asyncpg.UniqueViolationError as exc:
            raise AccountError(f"a client account named {name!r} already exists") from exc
        issued = await _issue_key(conn, account_id, name)
        if credit:
            await deposit(conn, account_id, credit, description="opening credit")
    return issued


async def ensure_demo_key(conn: asyncpg.Connection, name: str = "demo", credit: int = 10 * money.SCALE) -> IssuedKey:
    """A fresh key on the client account `name` (created if missing), topped up to at least `credit`."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('farmesh.demo-account'))")
        account_id = await conn.fetchval("SELECT account_id FROM far_accounts WHERE kind = 'client' AND name = $1", name)
        if account_id is None:
            account_id = uuid.uuid4()
            await conn.execute("INSERT INTO far_accounts (account_id, kind, name) VALUES ($1, 'client', $2)",
                               account_id, name)
        issued = await _issue_key(conn, account_id, name)
        have, reserved = await balance(conn, account_id)
        if have - reserved < credit:
            await deposit(conn, account_id, credit - (have - reserved), description="demo top-up")
    return issued


async def find_client(conn: asyncpg.Connection | asyncpg.Pool, ref: str) -> asyncpg.Record:
    """A client account by key prefix, account id or name."""
    row = await conn.fetchrow(
        """SELECT a.account_id, a.name FROM far_accounts a
           WHERE a.kind = 'client' AND (a.name = $1 OR a.account_id::text = $1
                 OR a.account_id IN (SELECT account_id FROM far_api_keys WHERE prefix = $1))""", ref)
    if row is None:
        raise AccountError(f"no client account or key {ref!r}")
    return row


async def revoke(conn: asyncpg.Connection, ref: str) -> list[str]:
    """Revoke a key (by prefix) or every key of an account (by name or id); returns the revoked prefixes."""
    rows = await conn.fetch(
        """UPDATE far_api_keys SET revoked_at = now()
           WHERE revoked_at IS NULL AND (prefix = $1 OR account_id IN (
               SELECT account_id FROM far_accounts WHERE kind = 'client' AND (name = $1 OR account_id::text = $1)))
           RETURNING prefix""", ref)
    if not rows:
        if await conn.fetchval("SELECT 1 FROM far_api_keys k JOIN far_accounts a USING (account_id) "
                               "WHERE k.prefix = $1 OR a.name = $1 OR a.account_id::text = $1", ref) is None:
            raise AccountError(f"no API key or client account {ref!r}")
    return [r["prefix"] for r in rows]


async def list_clients(conn: asyncpg.Connection | asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT a.account_id, a.name, a.created_at, k.prefix, k.created_at AS key_created_at, k.revoked_at,
                  b.balance,
                  (SELECT COALESCE(sum(amount), 0) FROM far_reservations r
                    WHERE r.account_id = a.account_id AND r.status = 'open') AS reserved
           FROM far_accounts a
           JOIN far_account_balances b USING (account_id)
           LEFT JOIN far_api_keys k USING (account_id)
           WHERE a.kind = 'client'
           ORDER BY a.name, k.created_at""")
    return [{**dict(r), "available": r["balance"] - r["reserved"]} for r in rows]


# --------------------------------------------------------------------------------------------- gateway side

_KEY = """
SELECT k.key_id, k.prefix, k.revoked_at, a.account_id, a.name
FROM far_api_keys k JOIN far_accounts a USING (account_id)
WHERE k.key_hash = $1 AND a.kind = 'client'
"""


async def authenticate(conn: asyncpg.Connection | asyncpg.Pool, authorization: str | None) -> Client:
    key = bearer_key(authorization)
    if key is None:
        raise Unauthorized("missing API key: send `Authorization: Bearer KEY`")
    row = await conn.fetchrow(_KEY, hash_key(key))
    if row is None:
        raise Unauthorized("unknown API key")
    if row["revoked_at"] is not None:
        raise Unauthorized(f"API key {row['prefix']}... was revoked")
    return Client(row["account_id"], row["name"], row["key_id"], row["prefix"])


@dataclass(frozen=True)
class Existing:
    """The reservation a repeated request id (same account, same parameters) already made."""

    request_id: str
    status: str  # open | settled | released
    deadline: datetime | None


class AlreadyRequested(AccountError):
    """The same account already asked this (request id and parameters): answer with that request's result."""

    def __init__(self, existing: Existing) -> None:
        super().__init__(f"request_id {client_request_id(existing.request_id)!r} was already accepted "
                         f"({existing.status})")
        self.existing = existing


class ParametersDiffer(AccountError):
    """A request id (Idempotency-Key) reused by the same account for a different request (HTTP 422)."""


class QueueFull(AccountError):
    """The model already has as many pending requests as allowed (HTTP 429, retry later)."""

    def __init__(self, model: str, pending: int, retry_after: int) -> None:
        super().__init__(f"model {model!r} has {pending} pending requests, the most it queues; "
                         f"retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Reservation:
    """What reserve() needs besides the key: one request's identity, price and bounds."""

    request_id: str
    model: str
    max_tokens: int
    price: Decimal
    fee_rate: Decimal
    request_hash: str | None = None  # sha256 of the parameters (None: not checked)
    deadline: datetime | None = None  # a request not started by then is never run; after it, not pending
    max_pending: int | None = None  # per model, over every gateway (None: unbounded)
    retry_after: int = 1


async def reserve(pool: asyncpg.Pool, authorization: str | None, request: Reservation) -> tuple[Client, int]:
    """Authenticate and hold max_tokens x price on the client's account, keyed by request_id.

    One round trip to the database function far_reserve (migration 007), which runs in one transaction with
    the account row locked, so concurrent requests of one account (on any number of gateways) cannot together
    spend more than it has; the model's pending requests are counted under a per-model advisory lock, so all
    gateways together queue at most max_pending. request.request_id is the mesh's id, scoped by the key's account
    (mesh_request_id), so only this account's own ids are ever found: one it already used with the same
    parameters raises AlreadyRequested (nothing is held twice), with others ParametersDiffer. Messages name the
    client's own id. Returns the client and the amount held.
    """
    key = bearer_key(authorization)
    if key is None:
        raise Unauthorized("missing API key: send `Authorization: Bearer KEY`")
    amount = pricing.reservation_amount(request.max_tokens, money.to_base_units(request.price))
    row = await pool.fetchrow(
        "SELECT * FROM far_reserve($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        hash_key(key), request.request_id, request.model, request.max_tokens, request.price, request.fee_rate,
        money.to_far(amount), request.request_hash, request.deadline, request.max_pending)
    outcome = row["outcome"]
    if outcome == "unknown_key":
        raise Unauthorized("unknown API key")
    if outcome == "revoked":
        raise Unauthorized(f"API key {row['prefix']}... was revoked")
    shown = client_request_id(request.request_id)  # the caller's own id, in what it is told
    if outcome == "duplicate":
        raise DuplicateRequest(f"request_id {shown!r} names a session recorded without a reservation; "
                               "use a new request_id / Idempotency-Key")
    if outcome == "parameters_differ":
        raise ParametersDiffer(f"request_id {shown!r} was already used for a request with other "
                               "parameters; use a new request_id / Idempotency-Key")
    if outcome == "already":
        raise AlreadyRequested(Existing(request.request_id, row["existing_status"], row["existing_deadline"]))
    if outcome == "queue_full":
        raise QueueFull(request.model, row["pending"], request.retry_after)
    if outcome == "insufficient":
        raise InsufficientFunds(amount, units(row["available"]))
    if outcome != "reserved":
        raise RuntimeError(f"far_reserve answered {outcome!r}")
    return Client(row["account_id"], row["name"], row["key_id"], row["prefix"]), amount


async def release(conn: asyncpg.Connection | asyncpg.Pool, request_id: str, reason: str) -> bool:
    """Release a reservation that will not be settled (the request could not be queued)."""
    status = await conn.execute(
        "UPDATE far_reservations SET status = 'released', closed_at = now(), reason = $2 "
        "WHERE request_id = $1 AND status = 'open'", request_id, reason)
    return status.endswith(" 1")


async def reservation_status(conn: asyncpg.Connection | asyncpg.Pool, request_id: str) -> str | None:
    """The state of `request_id`'s reservation (open, settled, released); None when it never had one."""
    return await conn.fetchval("SELECT status FROM far_reservations WHERE request_id = $1", request_id)
