"""Gateway side of the money: API keys (401), the reservation at request time (402), JSON errors.

A generation request is accepted only with `Authorization: Bearer KEY` of a client account that can
cover max_tokens x price: that amount is reserved, keyed by request_id, in one PostgreSQL transaction
with the account row locked (farmesh.accounts.reserve) BEFORE anything is published; a refused request
publishes nothing. The ledger settles the reservation when the session's outcome arrives.
"""
from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from farmesh import accounts, money

__all__ = ["error_response", "accounts"]


def error_response(exc: accounts.AccountError) -> JSONResponse:
    """The JSON error for a refused request: 401 (key), 402 (balance) or 409 (request id used)."""
    body: dict[str, Any] = {"detail": str(exc)}
    headers: dict[str, str] = {}
    if isinstance(exc, accounts.Unauthorized):
        status, body["error"] = 401, "unauthorized"
        headers["WWW-Authenticate"] = 'Bearer realm="farmesh"'
    elif isinstance(exc, accounts.InsufficientFunds):
        status, body["error"] = 402, "insufficient_funds"
        body["required_far"] = money.text(money.to_far(exc.required))
        body["available_far"] = money.text(money.to_far(exc.available))
    elif isinstance(exc, accounts.DuplicateRequest):
        status, body["error"] = 409, "duplicate_request_id"
    else:
        status, body["error"] = 400, "refused"
    return JSONResponse(status_code=status, content=body, headers=headers)
