"""The operator's API under /api/admin/, with the admin token (FARMESH_ADMIN_TOKEN, `Authorization: Bearer`).

POST /api/admin/keys                          {"name", "credit_far", "credit_id"?, "limits"?} -> 201, the key once
GET  /api/admin/accounts                      ?limit=&offset=: client accounts with balances and keys
POST /api/admin/keys/{prefix}/revoke          revoke a key (repeating it changes nothing)
PUT  /api/admin/keys/{prefix}/limits          {"requests_per_minute", "tokens_per_minute", "monthly_budget_far"}
POST /api/admin/accounts/{account_id}/credits {"credit_id", "amount_far", "description"?}: 201 posted, 200 when the
                                              id was posted already (never twice), 409 the id used otherwise
GET  /api/admin/accounts/{account_id}/usage   as the client's /api/usage, for any account
GET  /api/admin/audit                         ?limit=: the admin actions, newest first

Without the token configured the whole API is off (404, as any unknown path). The token is checked before the
body is read: none 401, another 403 (hmac.compare_digest). Every action that is carried out is recorded in
far_admin_audit (what, on what, when, from where: peer address, X-Forwarded-For, User-Agent) in the same
transaction as what it does; a refused request writes nothing. FAR amounts are exact decimal strings, never JSON
numbers: a number, a negative or an absurd amount is a 422 naming the field.
"""
from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Coroutine
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Body, HTTPException, Path, Query, Request
from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from db.views import usage as usage_view
from farmesh.billing import accounts
from farmesh.billing.accounts import AccountError, CreditConflict
from farmesh.billing.limits import Limits
from producers.gateway.account_api import (KEY_EXAMPLE, Far, GroupByQuery, Invalid, KeyOut, KeyPrefix, LimitsOut,
                                           Since, Until, UsageOut, balance_json, far, json_response, key_json,
                                           limits_json, refusals, usage_json, window)
from producers.gateway.guard import JSONRoute
from schemas import money

_NO_NUL = r"^[^\x00]*$"
MAX_CREDIT = 10**12  # FAR per credit: anything larger is a typo


def _amount(value: str, *, allow_zero: bool) -> Decimal:
    """A FAR amount given as text, checked: exact (at most 18 decimals), not negative, not absurd."""
    try:
        amount = Decimal(value)
        units = money.to_base_units(amount)
    except (InvalidOperation, ArithmeticError, ValueError):
        raise ValueError("must be an exact FAR amount with at most 18 decimals") from None
    if units < 0 or (units == 0 and not allow_zero):
        raise ValueError(f"must be {'zero or ' if allow_zero else ''}positive")
    if amount > MAX_CREDIT:
        raise ValueError(f"must be at most {MAX_CREDIT} FAR")
    return amount


def _checked(allow_zero: bool) -> AfterValidator:
    def check(value: str) -> str:
        _amount(value, allow_zero=allow_zero)
        return value

    return AfterValidator(check)


AmountText = Annotated[str, Field(pattern=r"^[0-9]{1,13}(\.[0-9]{1,18})?$", examples=["10", "0.5"],
                                  description="FAR as an exact decimal string (never a JSON number)")]
ZeroOrMoreFar = Annotated[AmountText, _checked(allow_zero=True)]
PositiveFar = Annotated[AmountText, _checked(allow_zero=False)]
CreditId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$",
                                description="the caller's id of a credit: a credit retried with it is posted once")]


class LimitsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    requests_per_minute: int | None = Field(default=None, ge=1, le=1_000_000, description="null: no limit")
    tokens_per_minute: int | None = Field(default=None, ge=1, le=1_000_000_000, description="null: no limit")
    monthly_budget_far: PositiveFar | None = Field(default=None, description="FAR per calendar month; null: none")

    def limits(self) -> Limits:
        budget = None if self.monthly_budget_far is None else money.to_base_units(Decimal(self.monthly_budget_far))
        return Limits(self.requests_per_minute, self.tokens_per_minute, budget)


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200, pattern=_NO_NUL, description="the client account's name (unique)")
    credit_far: ZeroOrMoreFar = Field(default="0", description="opening credit")
    credit_id: CreditId | None = Field(default=None, description="the opening credit's id, default: from the name")
    limits: LimitsIn = Field(default_factory=LimitsIn)


class CreatedKey(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "key": "fmk_HwiqoYgYLLRotecMm-xt1SPEnO9nTYJv-Bcmj5aJuZw", "prefix": "fmk_HwiqoYgY",
        "account_id": "5f47d792-6066-4d88-92c2-6bb63491b409", "name": "acme", "credit_far": "10",
        "limits": KEY_EXAMPLE["limits"]}]})
    key: str = Field(description="the API key: shown once, only its hash is kept")
    prefix: str
    account_id: UUID
    name: str
    credit_far: Far
    limits: LimitsOut


class Credit(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    credit_id: CreditId
    amount_far: PositiveFar
    description: str = Field(default="credit via the admin API", max_length=200, pattern=_NO_NUL)


class Credited(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "credit_id": "invoice-2026-12-001", "txn_id": "3b0c1d9e-5a41-5f53-9b7e-2f0a6c1e8d44",
        "account_id": "5f47d792-6066-4d88-92c2-6bb63491b409", "amount_far": "25", "posted": True,
        "balance_far": "34.999"}]})
    credit_id: str
    txn_id: UUID
    account_id: UUID
    amount_far: Far
    posted: bool = Field(description="false: this credit id had been posted already; nothing was posted again")
    balance_far: Far


class AccountEntry(BaseModel):
    account_id: UUID
    name: str
    balance_far: Far
    reserved_far: Far
    available_far: Far
    keys: list[KeyOut]


class AccountsOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"accounts": [{
        "account_id": "5f47d792-6066-4d88-92c2-6bb63491b409", "name": "acme", "balance_far": "9.999",
        "reserved_far": "0", "available_far": "9.999", "keys": [KEY_EXAMPLE]}]}]})
    accounts: list[AccountEntry]


class Revoked(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"prefix": "fmk_HwiqoYgY", "revoked": True}]})
    prefix: str
    revoked: bool = Field(description="false: it was revoked already")


class LimitsSet(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"prefix": "fmk_HwiqoYgY", "limits": {
        "requests_per_minute": 60, "tokens_per_minute": 20000, "monthly_budget_far": "50"}}]})
    prefix: str
    limits: LimitsOut


class AuditEntry(BaseModel):
    id: int
    at: datetime
    action: str
    target: str | None
    detail: dict[str, Any]
    remote_addr: str | None
    forwarded_for: str | None
    user_agent: str | None


class AuditOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"actions": [{
        "id": 7, "at": "2026-12-04T19:34:29.380000+00:00", "action": "create_key", "target": "fmk_HwiqoYgY",
        "detail": {"name": "acme", "credit_far": "10", "limits": {"requests_per_minute": 2}},
        "remote_addr": "127.0.0.1", "forwarded_for": None, "user_agent": "curl/8.14.1"}]}]})
    actions: list[AuditEntry]


# --------------------------------------------------------------------------------------------- the token

def admin_route(token: str | None) -> type[JSONRoute]:
    """The route class of the admin API: the token is checked before anything else (the body included)."""
    expected = token.encode("utf-8") if token else None

    class AdminRoute(JSONRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                if expected is None:
                    raise HTTPException(404, "Not Found")  # the admin API is off: as any unknown path
                given = accounts.bearer_key(request.headers.get("authorization"))
                if given is None:
                    raise HTTPException(401, "the admin API needs `Authorization: Bearer <FARMESH_ADMIN_TOKEN>`",
                                        headers={"WWW-Authenticate": 'Bearer realm="farmesh-admin"'})
                if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
                    raise HTTPException(403, "wrong admin token")
                return await handler(request)

            return route

    return AdminRoute


async def record(conn: asyncpg.Connection, request: Request, action: str, target: str | None,
                 detail: dict[str, Any] | None = None) -> None:
    """One admin action in far_admin_audit (in the caller's transaction)."""
    await conn.execute(
        "INSERT INTO far_admin_audit (action, target, detail, remote_addr, forwarded_for, user_agent) "
        "VALUES ($1, $2, $3::jsonb, $4, $5, $6)",
        action, target, json.dumps(detail or {}), request.client.host if request.client else None,
        (request.headers.get("x-forwarded-for") or "")[:200] or None,
        (request.headers.get("user-agent") or "")[:200] or None)


# --------------------------------------------------------------------------------------------- routes

AccountPath = Annotated[UUID, Path(description="a client account's id")]
PrefixPath = Annotated[str, Path(pattern=r"^fmk_[A-Za-z0-9_\-]{8}$", description="the key's first 12 characters")]


def router(get_pool: Callable[[], asyncpg.Pool], admin_token: str | None) -> APIRouter:
    api = APIRouter(prefix="/api/admin", tags=["admin"], route_class=admin_route(admin_token))
    base = refusals({401: "no admin token", 403: "wrong admin token",
                     404: "the admin API is off (FARMESH_ADMIN_TOKEN unset), or no such account or key",
                     422: "invalid body or parameters (the field is named)"})

    async def client_account(conn: asyncpg.Connection, account_id: UUID) -> None:
        if await conn.fetchval("SELECT 1 FROM far_accounts WHERE account_id = $1 AND kind = 'client'",
                               account_id) is None:
            raise HTTPException(404, f"no client account {account_id}")

    @api.post("/keys", status_code=201, response_model=CreatedKey, summary="Create a client account with a key",
              responses={**base, 409: {"model": base[401]["model"], "description": "the name is taken"}})
    async def create_key(request: Request, body: CreateKey = Body(openapi_examples={
            "limited": {"summary": "a key with 10 FAR and 2 requests a minute", "value": {
                "name": "acme", "credit_far": "10", "limits": {"requests_per_minute": 2}}},
            "all limits": {"summary": "every limit", "value": {
                "name": "globex", "credit_far": "100.5", "credit_id": "globex-opening",
                "limits": {"requests_per_minute": 60, "tokens_per_minute": 5000, "monthly_budget_far": "50"}}}})) -> Any:
        limits = body.limits.limits()
        credit = money.to_base_units(Decimal(body.credit_far))
        async with get_pool().acquire() as conn, conn.transaction():
            try:
                issued = await accounts.create_client(conn, body.name, credit, limits,
                                                      credit_id=body.credit_id or f"opening:{body.name}")
            except CreditConflict as exc:
                raise HTTPException(409, str(exc)) from None
            except AccountError as exc:
                raise HTTPException(409, str(exc)) from None
            await record(conn, request, "create_key", issued.prefix,
                         {"account_id": str(issued.account_id), "name": body.name, "credit_far": far(credit),
                          "limits": limits_json(limits)})
        return json_response({"key": issued.key, "prefix": issued.prefix, "account_id": issued.account_id,
                              "name": issued.name, "credit_far": far(credit), "limits": limits_json(limits)}, 201)

    @api.get("/accounts", response_model=AccountsOut, summary="Client accounts, their balances and keys",
             responses=base)
    async def list_accounts(request: Request, limit: Annotated[int, Query(ge=1, le=500)] = 100,
                            offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> Any:
        async with get_pool().acquire() as conn, conn.transaction():
            rows = await usage_view.clients(conn, limit, offset)
            keys = await usage_view.keys(conn, [r["account_id"] for r in rows])
            await record(conn, request, "list_accounts", None, {"limit": limit, "offset": offset})
        return json_response({"accounts": [{**balance_json(r), "keys": [key_json(k) for k in keys[r["account_id"]]]}
                                           for r in rows]})

    @api.post("/keys/{prefix}/revoke", response_model=Revoked, summary="Revoke a key", responses=base)
    async def revoke(request: Request, prefix: PrefixPath) -> Any:
        async with get_pool().acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT revoked_at FROM far_api_keys WHERE prefix = $1 FOR UPDATE", prefix)
            if row is None:
                raise HTTPException(404, f"no key {prefix!r}")
            revoked = row["revoked_at"] is None
            if revoked:
                await conn.execute("UPDATE far_api_keys SET revoked_at = now() WHERE prefix = $1", prefix)
            await record(conn, request, "revoke_key", prefix, {"revoked": revoked})
        return json_response({"prefix": prefix, "revoked": revoked})

    @api.put("/keys/{prefix}/limits", response_model=LimitsSet, summary="Set a key's limits (null: none)",
             responses=base)
    async def set_limits(request: Request, prefix: PrefixPath, body: LimitsIn = Body(openapi_examples={
            "two a minute": {"summary": "2 requests a minute, nothing else", "value": {"requests_per_minute": 2}},
            "all": {"summary": "every limit", "value": {"requests_per_minute": 60, "tokens_per_minute": 5000,
                                                        "monthly_budget_far": "50"}}})) -> Any:
        limits = body.limits()
        async with get_pool().acquire() as conn, conn.transaction():
            before = await conn.fetchrow("SELECT requests_per_minute, tokens_per_minute, monthly_budget "
                                         "FROM far_api_keys WHERE prefix = $1 FOR UPDATE", prefix)
            if before is None:
                raise HTTPException(404, f"no key {prefix!r}")
            await accounts.set_limits(conn, prefix, limits)
            await record(conn, request, "set_limits", prefix, {"before": limits_json(accounts.limits_of(before)),
                                                                "after": limits_json(limits)})
        return json_response({"prefix": prefix, "limits": limits_json(limits)})

    @api.post("/accounts/{account_id}/credits", response_model=Credited, status_code=201,
              summary="Credit an account, once per credit id",
              responses={**base, 200: {"model": Credited, "description": "this credit id was posted already"},
                         409: {"model": base[401]["model"], "description": "the credit id was used for another "
                                                                          "account or amount"}})
    async def credit(request: Request, account_id: AccountPath, body: Credit = Body(openapi_examples={
            "credit": {"summary": "10 FAR", "value": {"credit_id": "invoice-2026-001", "amount_far": "10"}}})) -> Any:
        amount = money.to_base_units(Decimal(body.amount_far))
        async with get_pool().acquire() as conn, conn.transaction():
            await client_account(conn, account_id)
            try:
                txn, posted = await accounts.credit_once(conn, account_id, amount, body.credit_id, body.description)
            except CreditConflict as exc:
                raise HTTPException(409, str(exc)) from None
            await record(conn, request, "credit", str(account_id),
                         {"credit_id": body.credit_id, "amount_far": far(amount), "posted": posted, "txn_id": str(txn)})
            have, _ = await accounts.balance(conn, account_id)
        return json_response({"credit_id": body.credit_id, "txn_id": txn, "account_id": account_id,
                              "amount_far": far(amount), "posted": posted, "balance_far": far(have)},
                             201 if posted else 200)

    @api.get("/accounts/{account_id}/usage", response_model=UsageOut, summary="Any account's usage", responses=base)
    async def account_usage(request: Request, account_id: AccountPath, since: Since = None, until: Until = None,
                            group_by: GroupByQuery = "day") -> Any:
        try:
            start, end = window(since, until)
        except Invalid as exc:
            return exc.response()
        async with get_pool().acquire() as conn, conn.transaction():
            await client_account(conn, account_id)
            out = await usage_json(conn, account_id, start, end, group_by)
            await record(conn, request, "read_usage", str(account_id),
                         {"since": start.isoformat(), "until": end.isoformat(), "group_by": group_by})
        return json_response(out)

    @api.get("/audit", response_model=AuditOut, summary="The admin actions, newest first", responses=base)
    async def audit(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Any:
        async with get_pool().acquire() as conn, conn.transaction():
            rows = await conn.fetch("SELECT * FROM far_admin_audit ORDER BY id DESC LIMIT $1", limit)
            await record(conn, request, "read_audit", None, {"limit": limit})
        return json_response({"actions": [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]})

    return api


__all__ = ["KeyPrefix", "router"]
