"""The native API: generation as Server-Sent Events, and the recorded sessions.

POST /api/inference/generate  {"prompt" | "messages", "max_tokens", "request_id", sampling...} -> SSE: `token`
                              events, then `done` (with usage) or `error`. Needs `Authorization: Bearer KEY`.
                              `messages` is a chat, rendered with the model's own template (producers.gateway.chat);
                              `prompt` is sent to the model as it is.
GET  /api/sessions/{id}       the recorded session and its contributions (from the ledger; the key's own)

Request ids are the client's own: the mesh knows a request as its id scoped by the caller's account
(farmesh.billing.accounts.mesh_request_id), and everything answered here names the client's id. Another account's
id is, for this caller, an id it has not used: a new request, or 404 like any unknown session.

Refusals are JSON {"error", "detail", ...} (producers.gateway.errors); parameter errors are 422 like every other
invalid body here (the OpenAI-compatible API, producers.gateway.openai_api, says 400 for the same refusals).
Types are strict: "10", true or 2.0 is not a max_tokens; the body is strict JSON (producers.gateway.guard).
"""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

from fastapi import APIRouter, Body, Header, HTTPException
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sse_starlette.sse import EventSourceResponse

from farmesh.billing.accounts import Unauthorized, mesh_request_id
from producers.gateway import chat
from producers.gateway.errors import AsciiJSONResponse, NativeError, native_body
from producers.gateway.guard import MAX_PROMPT_CHARS, JSONRoute
from producers.gateway.ports import Accounts, Sessions
from producers.gateway.submit import Ask, ClientRequestId, Finished, Live, Refused, Submitter, refusal
from schemas import money
from schemas.events import Sampling, StopSequence, TokenChunk


class GenerateRequest(BaseModel):
    # strict: no "10" -> 10, true -> 1, 2.0 -> 2. The schema says what _prompt_or_messages checks: one of the two.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS,
                               description="Raw text the model continues (or send messages)")
    messages: chat.Messages | None = Field(default=None, description="A chat, rendered with the model's template "
                                           "(or send prompt)")
    max_tokens: int = Field(default=100, ge=1)
    request_id: ClientRequestId | None = Field(default=None, description="Idempotency key, private to the account; "
                                               "default: the Idempotency-Key header, else a fresh id")
    model: str | None = Field(default=None, min_length=1, max_length=256,
                              description="Default: the model this gateway serves")
    temperature: float = Field(default=0.0, ge=0, le=2, allow_inf_nan=False, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0, le=100_000)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[StopSequence] = Field(default_factory=list, max_length=4)
    deadline_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                           description="Start within this many seconds or never (expired, charged "
                                           "nothing); default FARMESH_REQUEST_DEADLINE")

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


def native_error(refused: Refused) -> AsciiJSONResponse:
    # Parameter errors are 422 here, like every other invalid body of this API (OpenAI's API says 400).
    status = 422 if refused.status == 400 else refused.status
    return AsciiJSONResponse(native_body(refused.native, refused.message, **refused.extra), status_code=status,
                             headers=refused.headers)


def _refusals(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses: each status refused with a NativeError body."""
    return {status: {"model": NativeError, "description": text} for status, text in described.items()}


def router(submitter: Submitter, accounts: Accounts, sessions: Sessions) -> APIRouter:
    api = APIRouter(route_class=JSONRoute)
    model_name = submitter.settings.model_name

    @api.post("/api/inference/generate", response_class=EventSourceResponse,
              responses={200: {"description": "Server-Sent Events: token*, then done or error"},
                         **_refusals({401: "missing, unknown or revoked API key",
                                      402: "balance below max_tokens x price (adds required_far, available_far)",
                                      404: "unknown model",
                                      409: "request_id's earlier request was never queued (request_not_queued), "
                                           "or names a session recorded without a reservation",
                                      413: "body larger than FARMESH_MAX_REQUEST_BYTES",
                                      415: "body not JSON (Content-Type: application/json)",
                                      422: "invalid body or parameters (adds errors), or request_id reused with "
                                           "other parameters",
                                      429: "the model's queue is full (see Retry-After)"})})
    async def generate(body: GenerateRequest = Body(openapi_examples={
                           "plan": {"summary": "the plan's request", "value": {
                               "prompt": "Hello, how are you?", "max_tokens": 20, "request_id": "test-001"}},
                           "sampled": {"summary": "sampled, with a stop sequence", "value": {
                               "prompt": "Once upon a time", "max_tokens": 30, "temperature": 0.8, "top_p": 0.95,
                               "top_k": 40, "seed": 3, "stop": ["."], "model": model_name}},
                           "chat": {"summary": "a chat, in the model's own template", "value": {
                               "messages": [{"role": "user", "content": "What is the capital of France?"}],
                               "max_tokens": 40}}}),
                       authorization: str | None = Header(default=None),
                       idempotency_key: ClientRequestId | None = Header(default=None)) -> Any:
        if body.request_id and idempotency_key and body.request_id != idempotency_key:
            raise HTTPException(422, "request_id and the Idempotency-Key header differ; send one of them")
        sampling = Sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                            stop=body.stop)
        prompt = body.prompt if body.messages is None else chat.renderer(body.messages, submitter.tokenizer)
        ask = Ask(body.request_id or idempotency_key or uuid.uuid4().hex, body.model or model_name,
                  prompt, body.max_tokens, sampling, body.deadline_seconds)
        try:
            answer = await submitter.submit(ask, authorization)
        except Refused as refused:
            return native_error(refused)
        return EventSourceResponse(_relay(submitter, answer), ping=15)

    @api.get("/api/sessions/{request_id}", responses=_refusals({
        401: "missing, unknown or revoked API key", 404: "no such session of this key's account (yet)",
        422: "not a request id"}))
    async def get_session(request_id: ClientRequestId, authorization: str | None = Header(default=None)) -> Any:
        try:
            client = await accounts.authenticate(authorization)
        except Unauthorized as exc:
            submitter.metrics.unauthorized.inc()
            return native_error(refusal(exc))
        # The caller's own request of that id; another account's is not even looked at (the same 404 as none).
        session = await sessions.fetch(mesh_request_id(client.account_id, request_id))
        if session is None:  # recorded before ids were scoped by account: shown only to its own account (one
            session = await sessions.fetch(request_id)  # recorded with no account at all, to nobody)
            if session is not None and session.get("account_id") != client.account_id:
                session = None
        if session is None:
            raise HTTPException(404, f"no session {request_id!r} in the ledger (yet)")
        session = {**session, "request_id": request_id,  # the client's id, as it named the request
                   "contributions": [{**c, "request_id": request_id} for c in session.get("contributions", [])]}
        return jsonable_encoder(session, custom_encoder={Decimal: money.text})  # money stays exact

    return api


async def _relay(submitter: Submitter, answer: Live | Finished) -> AsyncIterator[dict[str, str]]:
    """The native SSE events of an answer: `token`*, then `done` (completed) or `error`."""
    if isinstance(answer, Finished):  # a repeated request: the recorded completion, whole
        if answer.completion:
            yield {"event": "token", "data": json.dumps({"index": 0, "token_id": None, "text": answer.completion,
                                                         "replayed": True})}
        payload = {"request_id": answer.request_id, "status": answer.status,
                   "finish_reason": answer.finish_reason, "usage": answer.usage.model_dump(mode="json"),
                   "error": answer.error}
        yield {"event": "done" if answer.status == "completed" else "error", "data": json.dumps(payload)}
        return
    try:
        async for event in submitter.follow(answer):
            if isinstance(event, TokenChunk):
                yield {"event": "token",
                       "data": json.dumps({"index": event.index, "token_id": event.token_id, "text": event.text})}
            else:
                payload = event.model_dump(mode="json", include={"status", "finish_reason", "usage", "error"})
                payload = {"request_id": answer.request_id, **payload}  # the client's id, not the mesh's
                yield {"event": "done" if event.status == "completed" else "error", "data": json.dumps(payload)}
    except TimeoutError:
        yield {"event": "error",
               "data": json.dumps({"request_id": answer.request_id, "error": "timed out waiting for the mesh"})}
