"""A client's own account over HTTP, with its key (`Authorization: Bearer KEY`), and the /account page.

GET /api/account            balance, open reservations, available, its credits (deposits), the key's limits and
                            what the key used this minute and this month
GET /api/usage              ?since=&until=&group_by=day|model|key[&key=PREFIX]: settled sessions, tokens and FAR
                            spent (the ledger's debits), per group and in total
GET /api/account/sessions   ?limit=: the most recent sessions with what each cost
GET /account                a self-contained page rendering the three (the key is typed in and kept in the page's
                            memory only; static/account.*)

Only the key's own account is ever read: a key prefix of another account (`key=`) is a 404 like an unknown one.
FAR amounts are exact decimal strings (schemas.money.text), never floats. The shapes (pydantic models below) are
shared with the admin API (producers.gateway.admin_api), which reads any account's usage the same way.
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Any, Literal
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Header, HTTPException, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from db.views import usage as usage_view
from farmesh.billing import accounts
from farmesh.billing.accounts import Unauthorized
from farmesh.billing.limits import Limits
from producers.gateway.errors import AsciiJSONResponse, NativeError, native_body
from producers.gateway.pages import Page
from schemas import money

FAR_PATTERN = r"^-?[0-9]+(\.[0-9]+)?$"
Far = Annotated[str, Field(pattern=FAR_PATTERN, description="FAR, an exact decimal string", examples=["12.5"])]
MAX_RANGE = timedelta(days=3660)  # ten years: a wider window is a typo
KeyPrefix = Annotated[str, Field(pattern=r"^fmk_[A-Za-z0-9_\-]{8}$", description="A key's first 12 characters")]


def far(value: Decimal | int) -> str:
    """An amount (NUMERIC FAR, or base units) as the APIs write it."""
    return money.text(value if isinstance(value, Decimal) else money.to_far(value))


# --------------------------------------------------------------------------------------------- shapes
# Each response shape carries an example (OpenAPI), taken from a `farmesh up` run.

_LIMITS_EXAMPLE = {"requests_per_minute": 2, "tokens_per_minute": None, "monthly_budget_far": None}
KEY_EXAMPLE = {"prefix": "fmk_HwiqoYgY", "created_at": "2026-12-04T19:34:29.377320+00:00", "revoked_at": None,
                   "limits": _LIMITS_EXAMPLE, "usage": {"requests_this_minute": 2, "tokens_this_minute": 10,
                                                       "spent_this_month_far": "0.001"}}
_BALANCE_EXAMPLE = {"account_id": "5f47d792-6066-4d88-92c2-6bb63491b409", "name": "acme", "balance_far": "9.999",
                    "reserved_far": "0", "available_far": "9.999"}
USAGE_EXAMPLE = {"account_id": "5f47d792-6066-4d88-92c2-6bb63491b409", "group_by": "model",
                 "since": "2026-11-04T19:34:32+00:00", "until": "2026-12-04T19:34:32+00:00",
                 "rows": [{"group": "smollm2-135m-instruct", "sessions": 2, "prompt_tokens": 72,
                           "completion_tokens": 10, "spent_far": "0.001"}],
                 "total": {"sessions": 2, "prompt_tokens": 72, "completion_tokens": 10, "spent_far": "0.001"}}

class LimitsOut(BaseModel):
    requests_per_minute: int | None = Field(description="null: no limit")
    tokens_per_minute: int | None = Field(description="counted on max_tokens at admission, corrected at settlement")
    monthly_budget_far: Far | None = Field(description="FAR per calendar month (UTC); null: no limit")


class KeyUse(BaseModel):
    requests_this_minute: int
    tokens_this_minute: int
    spent_this_month_far: Far = Field(description="held by open requests plus charged, this calendar month (UTC)")


class KeyOut(BaseModel):
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    limits: LimitsOut
    usage: KeyUse


class CreditOut(BaseModel):
    txn_id: UUID
    credit_id: str | None = Field(description="the operator's id of the credit (admin API), if it gave one")
    amount_far: Far
    at: datetime
    description: str


class AccountOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        **_BALANCE_EXAMPLE, "key": KEY_EXAMPLE, "limits": _LIMITS_EXAMPLE,
        "credits": [{"txn_id": "12172002-8bf2-5321-8956-32baf0386831", "credit_id": "opening:acme",
                     "amount_far": "10", "at": "2026-12-04T19:34:29.381946+00:00", "description": "opening credit"}]}]})
    account_id: UUID
    name: str
    balance_far: Far
    reserved_far: Far = Field(description="held by requests still running")
    available_far: Far = Field(description="balance minus reserved: what new requests may hold")
    key: KeyOut = Field(description="the key this request was made with")
    limits: LimitsOut = Field(description="the key's limits (as in key.limits)")
    credits: list[CreditOut] = Field(description="deposits, newest first (at most 50)")


class UsageRow(BaseModel):
    group: str = Field(description="the day (YYYY-MM-DD, UTC), the model or the key prefix")
    sessions: int
    prompt_tokens: int
    completion_tokens: int
    spent_far: Far


class UsageTotal(BaseModel):
    sessions: int
    prompt_tokens: int
    completion_tokens: int
    spent_far: Far


class UsageOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [USAGE_EXAMPLE]})
    account_id: UUID
    group_by: Literal["day", "model", "key"]
    since: datetime
    until: datetime
    rows: list[UsageRow]
    total: UsageTotal


class SessionOut(BaseModel):
    request_id: str = Field(description="the client's id of the request")
    model: str
    status: str
    prompt_tokens: int
    completion_tokens: int
    cost_far: Far = Field(description="what the ledger debited the account for it")
    finished_at: datetime | None
    key: str | None = Field(description="the prefix of the key that asked")


class SessionsOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"sessions": [
        {"request_id": "test-001", "model": "smollm2-135m-instruct", "status": "completed", "prompt_tokens": 36,
         "completion_tokens": 29, "cost_far": "0.0029", "finished_at": "2026-12-04T18:51:57.412000+00:00",
         "key": "fmk_DceayK0G"}]}]})
    sessions: list[SessionOut]


def limits_json(limits: Limits) -> dict[str, Any]:
    return {"requests_per_minute": limits.requests_per_minute, "tokens_per_minute": limits.tokens_per_minute,
            "monthly_budget_far": None if limits.monthly_budget is None else far(limits.monthly_budget)}


def key_json(row: dict[str, Any]) -> dict[str, Any]:
    return {"prefix": row["prefix"], "created_at": row["created_at"], "revoked_at": row["revoked_at"],
            "limits": limits_json(accounts.limits_of(row)),
            "usage": {"requests_this_minute": row["requests_this_minute"],
                      "tokens_this_minute": row["tokens_this_minute"],
                      "spent_this_month_far": far(row["spent_this_month"])}}


def balance_json(row: dict[str, Any]) -> dict[str, Any]:
    return {"account_id": row["account_id"], "name": row["name"], "balance_far": far(row["balance"]),
            "reserved_far": far(row["reserved"]), "available_far": far(row["available"])}


# --------------------------------------------------------------------------------------------- usage, shared

Since = Annotated[datetime | None, Query(description="from (ISO 8601; default: 30 days before until; no zone: UTC)")]
Until = Annotated[datetime | None, Query(description="to, exclusive (ISO 8601; default: now; no zone: UTC)")]
GroupByQuery = Annotated[Literal["day", "model", "key"], Query(description="one row per day (UTC), model or key")]


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def window(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    """[since, until) in UTC; a window that ends before it starts or spans more than MAX_RANGE is a 422 naming
    `since` (raised as the API's invalid_request)."""
    end = _utc(until) if until is not None else datetime.now(timezone.utc)
    start = _utc(since) if since is not None else end - timedelta(days=30)
    if start >= end:
        raise invalid("since", "must be before until")
    if end - start > MAX_RANGE:
        raise invalid("since", f"the window may span at most {MAX_RANGE.days} days")
    return start, end


class Invalid(Exception):
    """A 422 naming the field, in the native shape (like FastAPI's validation errors here)."""

    def __init__(self, where: str, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.where, self.field, self.message = where, field, message

    def response(self) -> AsciiJSONResponse:
        return AsciiJSONResponse(native_body("invalid_request", f"{self.field}: {self.message}",
                                             errors=[{"loc": [self.where, self.field], "msg": self.message,
                                                      "type": "value_error"}]), status_code=422)


def invalid(field: str, message: str, where: str = "query") -> Invalid:
    return Invalid(where, field, message)


async def usage_json(conn: asyncpg.Pool | asyncpg.Connection, account_id: UUID, since: datetime, until: datetime,
                     group_by: str, key_id: UUID | None = None) -> dict[str, Any]:
    rows = await usage_view.usage(conn, account_id, since, until, group_by, key_id)  # type: ignore[arg-type]
    total = usage_view.total(rows)
    return {"account_id": account_id, "group_by": group_by, "since": since, "until": until,
            "rows": [{"group": r["grp"], "sessions": r["sessions"], "prompt_tokens": r["prompt_tokens"],
                      "completion_tokens": r["completion_tokens"], "spent_far": far(r["spent"])} for r in rows],
            "total": {**{k: total[k] for k in ("sessions", "prompt_tokens", "completion_tokens")},
                      "spent_far": far(total["spent"])}}


def refusals(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": NativeError, "description": text} for status, text in described.items()}


def json_response(value: Any, status: int = 200) -> AsciiJSONResponse:
    return AsciiJSONResponse(jsonable_encoder(value, custom_encoder={Decimal: money.text}), status_code=status)


# --------------------------------------------------------------------------------------------- routes

def router(get_pool: Callable[[], asyncpg.Pool], on_unauthorized: Callable[[], None] = lambda: None) -> APIRouter:
    api = APIRouter(tags=["account"])
    auth = refusals({401: "missing, unknown or revoked API key", 422: "invalid parameters (the field is named)"})

    async def client_of(authorization: str | None) -> accounts.Client:
        try:
            return await accounts.authenticate(get_pool(), authorization)
        except Unauthorized as exc:
            on_unauthorized()
            raise HTTPException(401, str(exc), headers={"WWW-Authenticate": 'Bearer realm="farmesh"'}) from None

    @api.get("/api/account", response_model=AccountOut, summary="The key's account: balance, credits, limits",
             responses=auth)
    async def account(authorization: str | None = Header(default=None)) -> Any:
        client = await client_of(authorization)
        pool = get_pool()
        row = await usage_view.balance(pool, client.account_id)
        key = await usage_view.key_of(pool, client.account_id, client.prefix)
        if row is None or key is None:  # the account went away between the two reads: as unknown
            raise HTTPException(401, "unknown API key")
        credits = await usage_view.credits(pool, client.account_id)
        key_out = key_json(key)
        return json_response({**balance_json(row), "key": key_out, "limits": key_out["limits"],
                              "credits": [{"txn_id": c["txn_id"], "credit_id": c["credit_id"],
                                           "amount_far": far(c["amount"]), "at": c["occurred_at"],
                                           "description": c["description"]} for c in credits]})

    @api.get("/api/usage", response_model=UsageOut, summary="The account's usage: sessions, tokens, FAR spent",
             responses={**auth, 404: {"model": NativeError, "description": "key= names no key of this account"}})
    async def usage(since: Since = None, until: Until = None, group_by: GroupByQuery = "day",
                    key: Annotated[str | None, Query(pattern=r"^fmk_[A-Za-z0-9_\-]{8}$",
                                                     description="only this key's (a prefix of this account)")] = None,
                    authorization: str | None = Header(default=None)) -> Any:
        client = await client_of(authorization)
        try:
            start, end = window(since, until)
        except Invalid as exc:
            return exc.response()
        key_id = None
        if key is not None:
            found = await usage_view.key_of(get_pool(), client.account_id, key)
            if found is None:  # another account's key is not looked up: the same 404 as none
                raise HTTPException(404, f"no key {key!r} on this account")
            key_id = found["key_id"]
        return json_response(await usage_json(get_pool(), client.account_id, start, end, group_by, key_id))

    @api.get("/api/account/sessions", response_model=SessionsOut, summary="The account's recent sessions and costs",
             responses=auth)
    async def recent(limit: Annotated[int, Query(ge=1, le=200, description="how many, newest first")] = 20,
                     authorization: str | None = Header(default=None)) -> Any:
        client = await client_of(authorization)
        rows = await usage_view.sessions(get_pool(), client.account_id, limit)
        return json_response({"sessions": [
            {"request_id": accounts.client_request_id(r["request_id"]), "model": r["model"], "status": r["status"],
             "prompt_tokens": r["prompt_tokens"] or 0, "completion_tokens": r["completion_tokens"] or 0,
             "cost_far": far(r["cost"]), "finished_at": r["finished_at"], "key": r["prefix"]} for r in rows]})

    @api.get("/account", response_class=HTMLResponse, summary="The account page (type a key in)")
    async def page() -> HTMLResponse:
        return ACCOUNT.response(no_store=True)

    return api


# --------------------------------------------------------------------------------------------- /account

ACCOUNT = Page.load("account")
