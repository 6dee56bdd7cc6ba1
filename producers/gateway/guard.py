"""What the gateway checks of a request before doing any work for it: size, content type, strict JSON.

- BodyLimit (ASGI middleware): a body larger than FARMESH_MAX_REQUEST_BYTES is refused with 413 while it is
  read: at once when its Content-Length says so, else as soon as the bytes received pass the limit. Nothing
  larger is ever held in memory, parsed or quoted back. Any refusal sent before the body was read (413, 415)
  is written at once, then what the client still sends is read and dropped (at most DRAIN_BYTES, DRAIN_SECONDS)
  before the response ends: a client that sends its whole body before it reads (httpx, asyncio streams) gets
  the answer instead of a connection reset, and a 415 leaves the connection usable.
- JSONRoute (the APIRoute of every route that takes a body): a body that is not declared JSON is 415 before it
  is read; the JSON is parsed strictly (`strict_loads`): UTF-8 only, no NaN/Infinity, no number that overflows
  to infinity, no lone surrogate anywhere (Python's json module accepts all of these, and a NaN or a surrogate
  then fails wherever it is next encoded, as a 500). A bad body is the API's 4xx like any invalid field.
- The bounds of a prompt, however it is given (the native prompt, a completion prompt, chat messages in
  total): MAX_PROMPT_CHARS characters, chat at most MAX_MESSAGES messages.

Authentication comes before any tokenization or chat rendering (producers.gateway.submit); those bounds keep
even an authenticated request's work small, and it runs off the event loop.
"""
from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producers.gateway import errors

MAX_PROMPT_CHARS = 100_000  # InferenceRequested.prompt's bound: a longer prompt could never be published
MAX_MESSAGES = 256
DRAIN_BYTES = 64 * 1024 * 1024  # of a refused body, read and dropped so the client reads the refusal
DRAIN_SECONDS = 10.0


# --------------------------------------------------------------------------------------------- body size

class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes (FARMESH_MAX_REQUEST_BYTES)")


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, counting while they are read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        body = _Body(receive, pending=(declared or 0) > 0 or _header(scope, b"transfer-encoding") is not None)
        if declared is not None and declared > self.max_bytes:  # said so up front: not one byte is parsed
            refused = BodyTooLarge(self.max_bytes)
            answer = errors.response(scope["path"], 413, str(refused.detail), headers={"Connection": "close"})
            await answer(scope, receive, body.lingering(send))
            return

        async def counted() -> Message:
            message = await body.receive()
            if body.received > self.max_bytes:  # chunked, or more than its Content-Length said
                raise BodyTooLarge(self.max_bytes)  # raised in the route's body read: the API's 413
            return message

        await self.app(scope, counted, body.lingering(send))


class _Body:
    """A request body as the app reads it: how much came, whether more is on its way, and the draining of it
    when the app answers without reading it all."""

    def __init__(self, receive: Receive, pending: bool) -> None:
        self._receive, self.pending, self.received = receive, pending, 0

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.pending = bool(message.get("more_body"))
        else:
            self.pending = False  # http.disconnect
        return message

    async def drain(self) -> None:
        """Read and drop what the client still sends (bounded)."""
        deadline = asyncio.get_running_loop().time() + DRAIN_SECONDS
        dropped = 0
        while self.pending and dropped < DRAIN_BYTES:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            try:
                message = await asyncio.wait_for(self._receive(), remaining)
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))
            self.pending = bool(message.get("more_body"))

    def lingering(self, send: Send) -> Send:
        """`send`, except that a response ending while the body is still coming ends only after drain()."""

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body") and self.pending:
                await send({**message, "more_body": True})  # the whole answer goes out now
                await self.drain()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send(message)

        return sending


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------- strict JSON

class _Refused(ValueError):
    """A number strict_loads refuses (raised from json's hooks)."""


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:32]} is out of range")
    return value


def _lone_surrogate(value: Any) -> bool:
    """Whether any string in the parsed document (keys included) holds a surrogate code point."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and any("\ud800" <= c <= "\udfff" for c in item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # the only way a surrogate gets into valid UTF-8 JSON


def strict_loads(body: bytes) -> Any:
    """The body's JSON document, or json.JSONDecodeError (what FastAPI reports as an invalid body) for
    anything RFC 8259 does not allow or that could not be encoded again."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError("the body is not UTF-8", "", exc.start) from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise json.JSONDecodeError(exc.msg, "", exc.pos) from None
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None
    except ValueError as exc:  # our hooks (NaN, Infinity, 1e999), or an integer beyond Python's 4300 digits
        message = str(exc) if isinstance(exc, _Refused) else "a number too long to read"
        raise json.JSONDecodeError(message, "", 0) from None
    # A valid pair (\ud83d\ude00) is decoded into one character; what is left is a lone half.
    if _SURROGATE_ESCAPE.search(body) and _lone_surrogate(value):
        raise json.JSONDecodeError("a lone surrogate (\\ud800-\\udfff) is not text", "", 0)
    return value


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return "transfer-encoding" in request.headers or (length is not None and length.strip() != "0")


class JSONRoute(APIRoute):
    """A route whose body must be JSON (415 otherwise, before it is read), parsed by strict_loads."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def route(request: Request) -> Response:
            if takes_body:
                content_type = request.headers.get("content-type")
                if (content_type is None and _has_body(request)) or (content_type and not _is_json(content_type)):
                    raise HTTPException(415, "the body must be JSON: send Content-Type: application/json "
                                             f"(got {errors.excerpt(content_type or 'none', 40)})")
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return route
