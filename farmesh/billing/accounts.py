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

import dataclasses
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

from farmesh.billing import limits as limit_rule
from farmesh.billing import pricing
from farmesh.billing.limits import Limits

PLATFORM_ACCOUNT = uuid.UUID("00000000-0000-4000-8000-000000000001")
DEPOSITS_ACCOUNT = uuid.UUID("00000000-0000-4000-8000-000000000002")
PAYOUTS_ACCOUNT = uuid.UUID("00000000-0000-4000-8000-000000000003")

_NODE_NAMESPACE = uuid.UUID("5f1f4a8e-6c0b-4f7e-9a53-2f8e0d3c7b11")
_CREDIT_NAMESPACE = uuid.UUID("0b9f2a51-7c4e-4d8a-9e1f-6a3c5d7e9b20")
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


class RateLimited(AccountError):
    """The key is over one of its limits (HTTP 429 with Retry-After): nothing was reserved."""

    def __init__(self, exceeded: limit_rule.Exceeded) -> None:
        super().__init__(exceeded.message)
        self.limit = exceeded.limit
        self.retry_after = exceeded.retry_after


class CreditConflict(AccountError):
    """A credit id already used for another account or amount (HTTP 409): nothing is posted."""


@dataclass(frozen=True)
class Client:
    account_id: uuid.UUID
    name: str
    key_id: uuid.UUID
    prefix: str
    limits: Limits = Limits()


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


async def create_client(conn: asyncpg.Connection, name: str, credit: int = 0, limits: Limits | None = None,
                        *, credit_id: str | None = None) -> IssuedKey:
    """A new client account named `name` with one API key (with `limits`) and an optional opening credit
    (recorded under `credit_id` when given, like every credit of the admin API)."""
    async with conn.transaction():
        account_id = uuid.uuid4()
        try:
            await conn.execute("INSERT INTO far_accounts (account_id, kind, name) VALUES ($1, 'client', $2)",
                               account_id, name)
        except asyncpg.UniqueViolationError as exc:
            raise AccountError(f"a client account named {name!r} already exists") from exc
        issued = await _issue_key(conn, account_id, name)
        if limits is not None and limits.any:
            await set_limits(conn, issued.prefix, limits)
        if credit and credit_id is not None:
            await credit_once(conn, account_id, credit, credit_id, "opening credit")
        elif credit:
            await deposit(conn, account_id, credit, description="opening credit")
    return issued


def _limit_args(limits: Limits) -> tuple[Any, ...]:
    budget = None if limits.monthly_budget is None else money.to_far(limits.monthly_budget)
    return limits.requests_per_minute, limits.tokens_per_minute, budget


def limits_of(row: Any) -> Limits:
    """The limits of a far_api_keys row (its requests_per_minute, tokens_per_minute, monthly_budget)."""
    budget = row["monthly_budget"]
    return Limits(row["requests_per_minute"], row["tokens_per_minute"], None if budget is None else units(budget))


async def set_limits(conn: asyncpg.Connection | asyncpg.Pool, prefix: str, limits: Limits) -> bool:
    """Replace the limits of the key `prefix` (None: no such key). Returns whether the key exists."""
    problems = limits.problems()
    if problems:
        raise AccountError("; ".join(f"{f}: {m}" for f, m in problems))
    status = await conn.execute(
        "UPDATE far_api_keys SET requests_per_minute = $2, tokens_per_minute = $3, monthly_budget = $4 "
        "WHERE prefix = $1", prefix, *_limit_args(limits))
    return status.endswith(" 1")


async def credit_once(conn: asyncpg.Connection, account_id: uuid.UUID, amount: int, credit_id: str,
                      description: str = "credit") -> tuple[uuid.UUID, bool]:
    """Credit a client account once per `credit_id` (the caller's): (the posting, whether it was posted now).

    The posting's id is derived from credit_id, so two concurrent credits of one id post once (the second waits on
    the first's transaction row, then finds it). The same id for another account or amount: CreditConflict.
    """
    txn_id = uuid.uuid5(_CREDIT_NAMESPACE, f"credit:{credit_id}")

    async def existing() -> tuple[uuid.UUID, bool] | None:
        row = await conn.fetchrow("SELECT account_id, amount FROM far_credits WHERE credit_id = $1", credit_id)
        if row is None:
            return None
        if row["account_id"] != account_id or units(row["amount"]) != amount:
            raise CreditConflict(f"credit id {credit_id!r} was already used for "
                                 f"{money.text(row['amount'])} FAR to account {row['account_id']}; use a new id")
        return txn_id, False

    async with conn.transaction():
        if (found := await existing()) is not None:
            return found
        before = await conn.fetchval("SELECT 1 FROM far_ledger_transactions WHERE txn_id = $1", txn_id)
        if before is None:
            await deposit(conn, account_id, amount, txn_id=txn_id, description=description)
            inserted = await conn.fetchval(
                "INSERT INTO far_credits (credit_id, account_id, amount, txn_id, description) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (credit_id) DO NOTHING RETURNING 1",
                credit_id, account_id, money.to_far(amount), txn_id, description)
            if inserted:
                return txn_id, True
        found = await existing()  # another transaction posted this id meanwhile
        if found is None:
            raise CreditConflict(f"credit id {credit_id!r} is being posted; retry")
        return found


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
SELECT k.key_id, k.prefix, k.revoked_at, a.account_id, a.name, k.requests_per_minute, k.tokens_per_minute,
       k.monthly_budget
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
    return Client(row["account_id"], row["name"], row["key_id"], row["prefix"], limits_of(row))


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
    limits: Limits | None = None  # the key's, as authenticate read them: when any, reserve checks and counts them
    reply_topic: str | None = None  # the gateway's: a worker streams the request's tokens only there (migration 010)


# A limited key's usage, read after far_reserve took the account's row lock (so every gateway's admissions of this
# account are serialised here): the key's current limits, its counters of this minute, its spend this month (the
# reservation just made, $2, left out: the rule adds it).
_USAGE = """
SELECT now() AS now, k.requests_per_minute, k.tokens_per_minute, k.monthly_budget,
       COALESCE(c.requests, 0) AS requests, COALESCE(c.tokens, 0) AS tokens,
       (SELECT COALESCE(sum(CASE WHEN r.status = 'open' THEN r.amount ELSE COALESCE(r.charged, 0) END), 0)
          FROM far_reservations r
         WHERE r.key_id = $1 AND r.created_at >= date_trunc('month', now(), 'UTC') AND r.request_id <> $2) AS spent
FROM far_api_keys k
LEFT JOIN far_rate_counters c ON c.key_id = k.key_id AND c.window_start = date_trunc('minute', now(), 'UTC')
WHERE k.key_id = $1
"""
# Count an admitted request in its minute, and note the minute on its reservation (the ledger corrects that row).
_COUNT = """
WITH c AS (
    INSERT INTO far_rate_counters (key_id, window_start, requests, tokens)
    VALUES ($1, date_trunc('minute', now(), 'UTC'), 1, $3)
    ON CONFLICT (key_id, window_start) DO UPDATE
    SET requests = far_rate_counters.requests + 1, tokens = far_rate_counters.tokens + EXCLUDED.tokens
)
UPDATE far_reservations SET rate_window = date_trunc('minute', now(), 'UTC') WHERE request_id = $2
"""


async def reserve(pool: asyncpg.Pool, authorization: str | None, request: Reservation) -> tuple[Client, int]:
    """Authenticate and hold max_tokens x price on the client's account, keyed by request_id.

    One round trip to the database function far_reserve (migrations 007, 010), which runs in one transaction with
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
    args = (hash_key(key), request.request_id, request.model, request.max_tokens, request.price, request.fee_rate,
            money.to_far(amount), request.request_hash, request.deadline, request.max_pending, request.reply_topic)
    if request.limits is None or not request.limits.any:
        return _reserved(await pool.fetchrow(_RESERVE, *args), request, amount), amount
    # A limited key: the reservation, the check and the count in one transaction (refused: all rolled back).
    async with pool.acquire() as conn, conn.transaction():
        client = _reserved(await conn.fetchrow(_RESERVE, *args), request, amount)
        usage = await conn.fetchrow(_USAGE, client.key_id, request.request_id)
        current = limits_of(usage)
        exceeded = limit_rule.check(current, limit_rule.Usage(usage["now"], usage["requests"], usage["tokens"],
                                                              units(usage["spent"])), request.max_tokens, amount)
        if exceeded is not None:
            raise RateLimited(exceeded)
        await conn.execute(_COUNT, client.key_id, request.request_id, request.max_tokens)
    return dataclasses.replace(client, limits=current), amount


_RESERVE = "SELECT * FROM far_reserve($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"


def _reserved(row: asyncpg.Record, request: Reservation, amount: int) -> Client:
    """The client far_reserve reserved for, or its refusal raised."""
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
    return Client(row["account_id"], row["name"], row["key_id"], row["prefix"], request.limits or Limits())


async def release(conn: asyncpg.Connection | asyncpg.Pool, request_id: str, reason: str) -> bool:
    """Release a reservation that will not be settled (the request could not be queued, or an operator gave it
    up); the tokens it counted against its key's minute are given back (its request still counts)."""
    released = await conn.fetchval(
        """WITH r AS (UPDATE far_reservations SET status = 'released', closed_at = now(), reason = $2
                      WHERE request_id = $1 AND status = 'open' RETURNING key_id, rate_window, max_tokens),
                k AS (UPDATE far_rate_counters c SET tokens = GREATEST(0, c.tokens - r.max_tokens) FROM r
                      WHERE c.key_id = r.key_id AND c.window_start = r.rate_window)
           SELECT count(*) FROM r""", request_id, reason)
    return released == 1


async def reservation_status(conn: asyncpg.Connection | asyncpg.Pool, request_id: str) -> str | None:
    """The state of `request_id`'s reservation (open, settled, released); None when it never had one."""
    return await conn.fetchval("SELECT status FROM far_reservations WHERE request_id = $1", request_id)
