"""OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models.

The official `openai` SDKs work against it unchanged (base_url = the gateway's /v1, api_key = a farmesh key).
Streams are OpenAI's SSE chunks ending in `data: [DONE]`, with a usage chunk when stream_options.include_usage
is set; errors are OpenAI's error JSON. The request id is the Idempotency-Key header when given (a repeated key
returns the same completion, generated and charged once), else a fresh one; the response id embeds it. A key is
private to its account (the mesh scopes it: farmesh.billing.accounts.mesh_request_id): another account's identical
key is another request, and every response names the client's own key, never the mesh's id.
Extensions beyond OpenAI's parameters: top_k, and the X-Farmesh-Deadline header (seconds to start by).

Parameters this mesh does not implement (tools, response_format other than text, logit_bias, top_logprobs, ...)
are refused with OpenAI's 400 naming the parameter (`unsupported_parameter`), never silently ignored; other
unknown parameters are ignored, as OpenAI's clients expect. Types are strict ("10", true or 2.0 is not a
max_tokens) and the body is strict JSON (producers.gateway.guard).
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar, Literal

from fastapi import APIRouter, Body, Header
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from sse_starlette.sse import EventSourceResponse

from farmesh.models.defaults import SamplingDefaults, sampling_defaults
from producers.gateway import chat, errors
from producers.gateway.errors import AsciiJSONResponse, ErrorBody
from producers.gateway.guard import MAX_PROMPT_CHARS, JSONRoute
from producers.gateway.submit import Ask, ClientRequestId, Finished, Live, Refused, RouteCheck, Submitter
from schemas.events import Sampling, StreamEnded, TokenChunk

# What a client may name its request (producers.gateway.submit.ClientRequestId), for the Idempotency-Key header.
_REQUEST_ID: TypeAdapter[str] = TypeAdapter(ClientRequestId)

# A session that did not complete, as the status of a whole (non-streamed) response.
_FAILED_STATUS = {"failed": 502, "cancelled": 502, "expired": 504}

error_body = errors.openai_body

# OpenAI parameters this mesh does not implement: a request that sets one (to anything but null) is refused.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
               "logit_bias", "top_logprobs", "audio", "modalities", "prediction", "reasoning_effort",
               "web_search_options")
UNSUPPORTED_TEXT = ("suffix", "best_of")  # /v1/completions only
_ACCEPTED = {"response_format": ({"type": "text"},), "best_of": (1,)}  # what the mesh does anyway


def refused_response(refused: Refused) -> AsciiJSONResponse:
    return AsciiJSONResponse(error_body(refused.status, refused.message, refused.code, refused.param),
                             status_code=refused.status, headers=refused.headers)


def validation_response(exc: RequestValidationError) -> AsciiJSONResponse:
    """OpenAI answers a malformed body with 400 and names the first bad parameter (no input quoted back)."""
    found = exc.errors()
    items = errors.problems(found)
    return AsciiJSONResponse(error_body(400, errors.summary(items, len(found) - len(items)), "invalid_value",
                                        errors.first_param(items)), status_code=400)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _Common(BaseModel):
    # Unknown OpenAI parameters are kept aside (model_extra): ignored, as OpenAI's clients expect, unless they
    # are ones this mesh does not implement (UNSUPPORTED: refused). Strict: "10" is not a number.
    model_config = ConfigDict(extra="allow", strict=True)
    unsupported_here: ClassVar[tuple[str, ...]] = UNSUPPORTED

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False,
                               description="Default: the model's (its generation_config.json), else 1")
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False,
                         description="Default: the model's, else 1")
    top_k: int = Field(default=0, ge=0, le=100_000, description="Extension: keep the k most likely tokens (0: all); "
                       "default: the model's, else 0")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(default=None, description="Up to 4 sequences (1-64 characters each)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only 1 choice per request")
    presence_penalty: float = Field(default=0, ge=0, le=0, description="Not supported (0 only)")
    frequency_penalty: float = Field(default=0, ge=0, le=0, description="Not supported (0 only)")
    user: str | None = Field(default=None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not 1 <= len(s) <= 64 for s in stops):
            raise ValueError("stop takes at most 4 sequences of 1 to 64 characters")
        return stops

    def sampling(self, defaults: SamplingDefaults) -> Sampling:
        """The request's sampling; what it leaves out is the model's default (farmesh.models.defaults)."""
        given = self.model_fields_set
        return Sampling(temperature=self.temperature if "temperature" in given else defaults.temperature,
                        top_p=self.top_p if "top_p" in given else defaults.top_p,
                        top_k=self.top_k if "top_k" in given else defaults.top_k,
                        seed=self.seed, stop=self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> Refused | None:
        """OpenAI's 400 for the first parameter set here that this mesh does not implement."""
        extra = self.model_extra or {}
        for name in self.unsupported_here:
            if extra.get(name) is not None and extra[name] not in _ACCEPTED.get(name, ()):
                return Refused(400, "unsupported_parameter", f"{name} is not supported by this mesh (text "
                               "generation only: no tools, functions, JSON mode, logit bias or log probabilities)",
                               param=name)
        return None


class CompletionRequest(_Common):
    unsupported_here: ClassVar[tuple[str, ...]] = UNSUPPORTED + UNSUPPORTED_TEXT

    prompt: str | list[str] = Field(description="One prompt (a list must hold exactly one string)")
    echo: bool = Field(default=False, description="Not supported (false only)")
    logprobs: int | None = Field(default=None, le=0, description="Not supported")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        prompts = [value] if isinstance(value, str) else value
        if len(prompts) != 1:
            raise ValueError("give exactly one prompt (batches are not supported)")
        if not 1 <= len(prompts[0]) <= MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt must have 1 to {MAX_PROMPT_CHARS} characters")
        return prompts[0]

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value


class ChatCompletionRequest(_Common):
    messages: chat.Messages
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    logprobs: bool = Field(default=False, description="Not supported (false only)")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool) -> bool:
        if value:
            raise ValueError("logprobs is not supported")
        return value

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if not any(m.content for m in self.messages):
            raise ValueError("the messages have no content")
        return self


# Response shapes, for the OpenAPI document only (the handlers build OpenAI's objects themselves).
class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["length", "stop"]


class ChatCompletion(BaseModel):
    """A whole chat completion; with `stream: true` the answer is text/event-stream `chat.completion.chunk`s."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChatChoice]
    usage: UsageOut


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["length", "stop"]


class Completion(BaseModel):
    """A whole text completion; with `stream: true` the answer is text/event-stream `text_completion` chunks."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[TextChoice]
    usage: UsageOut


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# With `stream: true`: OpenAI's SSE chunks (JSON objects, one per `data:` line), then `data: [DONE]`.
_STREAM: dict[str, Any] = {"text/event-stream": {}}



def router(submitter: Submitter, route_check: RouteCheck) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["openai"], route_class=JSONRoute,
                    responses={"4XX": {"model": ErrorBody, "description": "OpenAI's error object"}})
    defaults = sampling_defaults(submitter.settings.model_dir)

    def request_id(idempotency_key: str | None) -> str:
        if idempotency_key is None:
            return uuid.uuid4().hex
        try:
            return _REQUEST_ID.validate_python(idempotency_key)
        except ValidationError:
            raise Refused(400, "invalid_value", "Idempotency-Key must be 1-128 characters: letters, digits and . _ : - "
                          "(starting with a letter or digit)", param="Idempotency-Key") from None

    async def run(kind: Literal["chat", "text"], body: _Common, prompt: str | Callable[[], str], max_tokens: int,
                  authorization: str | None, idempotency_key: str | None, deadline: float | None) -> Any:
        try:
            if (refused := body.unsupported()) is not None:
                raise refused
            ask = Ask(request_id(idempotency_key), body.model, prompt, max_tokens, body.sampling(defaults), deadline)
            answer = await submitter.submit(ask, authorization)
        except Refused as refused:
            return refused_response(refused)
        shape = _Shape(kind, ask.request_id, body.model)
        if body.stream:
            return EventSourceResponse(_stream(submitter, answer, shape, body.include_usage), ping=15)
        if isinstance(answer, Live):
            text, ended = await _collect(submitter, answer)
        else:
            text, ended = answer.completion, _ended(answer)
        if ended.status != "completed":
            status = _FAILED_STATUS.get(ended.status, 502)
            return AsciiJSONResponse(error_body(status, f"generation {ended.status}: {ended.error or 'no result'}",
                                                ended.status), status_code=status)
        return shape.whole(text, ended)

    limits: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": description} for status, description in (
            (400, "invalid or unsupported parameters"), (401, "missing, unknown or revoked API key"),
            (402, "balance below max_tokens x price"), (404, "unknown model"),
            (409, "Idempotency-Key's earlier request was never queued, or names a session recorded without a "
                  "reservation"),
            (413, "body larger than FARMESH_MAX_REQUEST_BYTES"), (415, "body not JSON (Content-Type: application/json)"),
            (422, "Idempotency-Key reused with other parameters"),
            (429, "the model's queue is full (Retry-After)"),
            (502, "the generation failed (charged only the tokens delivered)"),
            (504, "the request expired: no worker started it before its deadline (not charged)"))}

    model = submitter.models[0]
    text_examples = {"stream": {"summary": "a streamed completion", "value": {
        "model": model, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.7, "seed": 1,
        "stream": True, "stream_options": {"include_usage": True}}},
        "whole": {"summary": "greedy, whole", "value": {"model": model, "prompt": "The mesh", "max_tokens": 8,
                                                          "temperature": 0, "stop": ["."]}}}
    chat_examples = {"stream": {"summary": "a streamed chat", "value": {
        "model": model, "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "What is Far Mesh?"}],
        "max_tokens": 16, "stream": True}},
        "whole": {"summary": "whole, sampled", "value": {
            "model": model, "messages": [{"role": "user", "content": "Hello"}], "max_completion_tokens": 8,
            "temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 7}}}

    @api.post("/completions", responses={200: {"model": Completion, "content": _STREAM}, **limits})
    async def completions(body: CompletionRequest = Body(openapi_examples=text_examples),
                          authorization: str | None = Header(default=None),
                          idempotency_key: str | None = Header(default=None),
                          x_farmesh_deadline: float | None = Header(default=None, gt=0, le=86_400,
                                                                      allow_inf_nan=False)) -> Any:
        max_tokens = body.max_tokens or 16  # OpenAI's default for completions
        return await run("text", body, body.prompt, max_tokens, authorization, idempotency_key, x_farmesh_deadline)

    @api.post("/chat/completions", responses={200: {"model": ChatCompletion, "content": _STREAM}, **limits})
    async def chat_completions(body: ChatCompletionRequest = Body(openapi_examples=chat_examples),
                               authorization: str | None = Header(default=None),
                               idempotency_key: str | None = Header(default=None),
                               x_farmesh_deadline: float | None = Header(default=None, gt=0, le=86_400,
                                                                      allow_inf_nan=False)) -> Any:
        prompt = chat.renderer(body.messages, submitter.tokenizer)
        max_tokens = body.max_completion_tokens or body.max_tokens or submitter.settings.max_new_tokens
        return await run("chat", body, prompt, max_tokens, authorization, idempotency_key, x_farmesh_deadline)

    @api.get("/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        """The models the swarm can serve end to end right now (every block online)."""
        try:
            servable = await route_check()
        except Exception:
            servable = False
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "farmesh"} for m in submitter.models if servable]}

    @api.get("/models/{model_id}", response_model=ModelCard,
             responses={404: {"model": ErrorBody, "description": "unknown model"}})
    async def model(model_id: str) -> Any:
        if model_id not in submitter.models:
            return AsciiJSONResponse(error_body(404, f"model {errors.excerpt(model_id)} does not exist",
                                                "model_not_found", "model"), status_code=404)
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "farmesh"}

    return api


class _Shape:
    """OpenAI's response objects for one request (chat or text completion)."""

    def __init__(self, kind: Literal["chat", "text"], request_id: str, model: str) -> None:
        self.kind, self.model = kind, model
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"
        self.created = int(time.time())

    def _object(self, stream: bool) -> str:
        if self.kind == "chat":
            return "chat.completion.chunk" if stream else "chat.completion"
        return "text_completion"

    def _head(self, stream: bool) -> dict[str, Any]:
        return {"id": self.id, "object": self._object(stream), "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def chunk(self, text: str | None, finish_reason: str | None, *, first: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, ended: StreamEnded) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage(ended)}

    def whole(self, text: str, ended: StreamEnded) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": ended.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": ended.finish_reason}
        return {**self._head(False), "choices": [choice], "usage": usage(ended)}


def usage(ended: StreamEnded) -> dict[str, int]:
    u = ended.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _ended(finished: Finished) -> StreamEnded:
    finish = finished.finish_reason if finished.finish_reason in ("length", "stop") else "error"
    return StreamEnded(request_id=finished.request_id, status=finished.status, finish_reason=finish,
                       usage=finished.usage, error=finished.error)


async def _collect(submitter: Submitter, live: Live) -> tuple[str, StreamEnded]:
    text = []
    async for event in submitter.follow(live):
        if isinstance(event, TokenChunk):
            text.append(event.text)
        else:
            return "".join(text), event
    raise RuntimeError("the reply stream ended without its end event")  # follow() always ends with one


async def _stream(submitter: Submitter, answer: Live | Finished, shape: _Shape,
                  include_usage: bool) -> AsyncIterator[dict[str, str]]:
    def data(payload: dict[str, Any]) -> dict[str, str]:
        return {"data": json.dumps(payload)}

    yield data(shape.chunk(None, None, first=True))
    if isinstance(answer, Finished):  # a repeated request: its recorded completion, in one chunk
        ended = _ended(answer)
        if answer.completion:
            yield data(shape.chunk(answer.completion, None))
    else:
        try:
            ended = None
            async for event in submitter.follow(answer):
                if isinstance(event, TokenChunk):
                    if event.text:
                        yield data(shape.chunk(event.text, None))
                else:
                    ended = event
        except TimeoutError:
            yield data(error_body(504, "timed out waiting for the mesh", "timeout"))
            return
        assert ended is not None
    if ended.status != "completed":
        # OpenAI's clients raise an APIError for an `error` object in the stream.
        yield data(error_body(_FAILED_STATUS.get(ended.status, 502), f"generation {ended.status}: "
                              f"{ended.error or 'no result'}", ended.status))
        return
    yield data(shape.chunk(None, ended.finish_reason))
    if include_usage:
        yield data(shape.usage_chunk(ended))
    yield {"data": "[DONE]"}
