"""The gateway's two error shapes, and the one way every refusal is written.

- The native API (and discovery, /health, ...): `{"error": <machine code>, "detail": <message for people>}`,
  plus what a refusal adds (402: required_far/available_far; an invalid body: `errors`, each a loc, msg, type).
- The OpenAI-compatible API (`/v1/...`): OpenAI's `{"error": {"message", "type", "param", "code"}}`.

Whatever the client sent, an error answer quotes at most a short excerpt of it (`excerpt`), and is written as
ASCII JSON: a lone surrogate or a control character in the input can never make the error unencodable (a 500
instead of the 4xx it deserves).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

EXCERPT = 64  # characters of the client's input an error message may quote

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
                 404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
                 413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
                 429: "rate_limit_error", 503: "server_error", 504: "timeout"}

# An HTTP status without a code of its own -> the native API's `error` (and OpenAI's `code`).
STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                413: "request_too_large", 415: "unsupported_media_type", 422: "invalid_request",
                429: "rate_limited", 503: "service_unavailable"}


def excerpt(value: Any, limit: int = EXCERPT) -> str:
    """repr() of the first `limit` characters of `value` ('...' when cut): control characters and lone
    surrogates come out escaped, and a 3 MB input quotes 64 characters."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


class AsciiJSONResponse(JSONResponse):
    """JSON that encodes whatever it quotes (ensure_ascii); non-finite numbers are still refused."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def openai_body(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def native_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": code, "detail": message, **extra}


def response(path: str, status: int, message: str, code: str | None = None, *, param: str | None = None,
             headers: Mapping[str, str] | None = None, **extra: Any) -> AsciiJSONResponse:
    """An error in the shape of the API `path` belongs to (extra fields: native API only)."""
    code = code or STATUS_CODES.get(status, "error")
    body = openai_body(status, message, code, param) if is_openai(path) else native_body(code, message, **extra)
    return AsciiJSONResponse(body, status_code=status, headers=dict(headers or {}))


# --------------------------------------------------------------------------------------------- invalid input

def _cut(text: str, limit: int) -> str:
    return text[:limit] + "..." if len(text) > limit else text


def problems(errors: Sequence[Mapping[str, Any]], limit: int = 5) -> list[dict[str, Any]]:
    """pydantic's / FastAPI's validation errors without the input they carry: where (each part cut short),
    what, and the error type; the first `limit` of them. An unreadable body is one problem at `body`."""
    out = []
    for error in errors[:limit]:
        loc = [p if isinstance(p, int) else _cut(str(p), 40) for p in error.get("loc", ())]
        message = _cut(str(error.get("msg", "invalid")), 200)
        ctx = error.get("ctx") or {}
        if error.get("type") == "json_invalid":  # FastAPI's loc is ("body", character position)
            position = loc[1] if len(loc) > 1 else None
            loc = ["body"]
            message = f"invalid JSON: {_cut(str(ctx.get('error', 'unreadable')), 120)}" + (
                f" (at character {position})" if position else "")
        out.append({"loc": loc, "msg": message, "type": _cut(str(error.get("type", "")), 64)})
    return out


def summary(items: Sequence[Mapping[str, Any]], more: int = 0) -> str:
    """`field: message; ...` (the body's fields without the leading 'body')."""
    parts = []
    for item in items:
        where = ".".join(_field_path(item["loc"], ("body",))) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "") or "invalid request"


# The member of a union pydantic names in an error's location (`stop: str | list[str]` -> ('stop', 'str') and
# ('stop', 'list[str]')): a type, not a parameter, so it is left out of the parameter's name.
_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "bytes", "list", "dict"}


def _field_path(loc: Sequence[Any], skip: Sequence[str]) -> list[str]:
    return [str(p) for p in loc if p not in skip
            and not (isinstance(p, str) and (p in _UNION_MEMBERS or "[" in p))]


def first_param(items: Sequence[Mapping[str, Any]]) -> str | None:
    """The first invalid parameter, as OpenAI names it (`messages.0.content`; `stop`, not pydantic's `stop.str`)."""
    if not items:
        return None
    return ".".join(_field_path(items[0]["loc"], ("body", "header", "query", "path"))) or None


# --------------------------------------------------------------------------------------------- OpenAPI models

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error object (every `/v1` refusal)."""

    error: ErrorDetail


class NativeError(BaseModel):
    """A native API refusal: a machine code and a message; some add fields (402: required_far, available_far;
    an invalid body: errors)."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="machine-readable: unauthorized, insufficient_funds, invalid_request, ...")
    detail: str = Field(description="for people")
