"""The thin gateway: clients publish requests and read tokens back as Server-Sent Events.

POST /api/inference/generate  {"prompt", "max_tokens", "request_id", sampling...} -> SSE: `token` events,
                              then `done` (with usage) or `error`. Needs `Authorization: Bearer KEY`.
POST /v1/completions, /v1/chat/completions, GET /v1/models   OpenAI-compatible (producers.gateway.openai_api)
GET  /api/sessions/{id}       the recorded session and its contributions (from the ledger; the key's own)
GET  /api/nodes, /api/nodes/{peer_id}, /api/swarm, /status   discovery (producers.gateway.discovery)
GET  /health                  200 only when broker, database and a full swarm route are reachable
GET  /metrics                 Prometheus

Every API goes through producers.gateway.submit (checks, reservation, idempotency, bounded queue). Tokens come
back on this gateway's own reply topic, farmesh.inference.replies.<gateway id>, which only it reads: any
number of gateways run side by side and every stream reaches the client that asked.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any, AsyncIterator

import asyncpg
from fastapi import Body, FastAPI, Header, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, make_asgi_app
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from db.views.sessions import fetch_session
from farmesh.billing import accounts
from farmesh.kafka import messaging
from schemas import money
from farmesh.runtime.settings import Settings
from producers.gateway import discovery, openai_api
from producers.gateway.discovery import LiveCoverage
from producers.gateway.streams import ReplyStreams
from producers.gateway.submit import Ask, Finished, Live, Metrics, Refused, RouteCheck, Submitter, Tokenizer, refusal
from schemas import topics
from schemas.events import ReplyEvent, RequestId, Sampling, StopSequence, TokenChunk

log = logging.getLogger(__name__)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=100_000)
    max_tokens: int = Field(default=100, ge=1)
    request_id: RequestId | None = Field(default=None, description="Idempotency key; default: the Idempotency-Key "
                                         "header, else a fresh id")
    model: str | None = Field(default=None, description="Default: the model this gateway serves")
    temperature: float = Field(default=0.0, ge=0, le=2, allow_inf_nan=False, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0, le=100_000)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[StopSequence] = Field(default_factory=list, max_length=4)
    deadline_seconds: float | None = Field(default=None, gt=0, description="Start within this many seconds or "
                                           "never (expired, charged nothing); default FARMESH_REQUEST_DEADLINE")


def native_error(refused: Refused) -> JSONResponse:
    # Parameter errors are 422 here, like every other invalid body of this API (OpenAI's API says 400).
    status = 422 if refused.status == 400 else refused.status
    body = {"detail": refused.message, "error": refused.native, **refused.extra}
    return JSONResponse(status_code=status, content=body, headers=refused.headers)


def load_tokenizer(settings: Settings) -> Tokenizer:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(settings.model_dir)


def create_app(settings: Settings, route_check: RouteCheck, stream_timeout: float = 120.0,
               live_coverage: LiveCoverage | None = None, tokenizer: Tokenizer | None = None) -> FastAPI:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    streams = ReplyStreams()
    broker = messaging.create_broker(settings.kafka_bootstrap, "gateway", registry)
    reply_topic = topics.reply_topic(settings.gateway_name)

    # This gateway's own reply topic: no group, no one else reads it.
    @broker.subscriber(reply_topic, auto_offset_reset="latest", fetch_max_wait_ms=settings.latency_fetch_wait_ms, title="gateway-replies",
                       description="Token streams for the requests this gateway published")
    async def on_reply(event: ReplyEvent) -> None:
        streams.deliver(event)

    state: dict[str, Any] = {}
    submitter = Submitter(settings, lambda: state["pool"], broker, streams, metrics,
                          tokenizer or load_tokenizer(settings), reply_topic, stream_timeout)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Created before subscribing: a consumer of a missing topic would wait for its metadata first.
        await messaging.ensure_topics(settings.kafka_bootstrap, [(reply_topic, 1)])
        await broker.start()
        state["pool"] = await asyncpg.create_pool(settings.require_database_url(), min_size=1, max_size=10)
        try:
            yield
        finally:
            await submitter.drain()
            await state["pool"].close()
            await broker.stop()

    app = FastAPI(title="Far Mesh gateway", version="0.2.0", lifespan=lifespan,
                  description="Pay-per-token generation on the Far Mesh Petals swarm: a native SSE API and an "
                              "OpenAI-compatible one (/v1). Authenticate with `Authorization: Bearer <farmesh key>`.")
    app.mount("/metrics", make_asgi_app(registry))
    # Discovery (node registry): /api/nodes, /api/nodes/{peer_id}, /api/swarm and the /status page.
    app.include_router(discovery.router(lambda: state["pool"], settings.model_name, live_coverage))
    app.include_router(openai_api.router(submitter, route_check))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            return openai_api.validation_response(exc)
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(StarletteHTTPException)  # Starlette's: also what FastAPI raises for an unparsable body
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            return JSONResponse(openai_api.error_body(exc.status_code, str(exc.detail), None),
                                status_code=exc.status_code, headers=getattr(exc, "headers", None))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.post("/api/inference/generate", response_class=EventSourceResponse,
              responses={200: {"description": "Server-Sent Events: token*, then done or error"},
                         401: {"description": "missing, unknown or revoked API key"},
                         402: {"description": "balance below max_tokens x price"},
                         404: {"description": "unknown model"},
                         409: {"description": "request_id used by another account"},
                         422: {"description": "invalid body, or request_id reused with other parameters"},
                         429: {"description": "the model's queue is full (see Retry-After)"}})
    async def generate(body: GenerateRequest = Body(openapi_examples={
                           "plan": {"summary": "the plan's request", "value": {
                               "prompt": "Hello, how are you?", "max_tokens": 20, "request_id": "test-001"}},
                           "sampled": {"summary": "sampled, with a stop sequence", "value": {
                               "prompt": "Once upon a time", "max_tokens": 30, "temperature": 0.8, "top_p": 0.95,
                               "top_k": 40, "seed": 3, "stop": ["."], "model": settings.model_name}}}),
                       authorization: str | None = Header(default=None),
                       idempotency_key: RequestId | None = Header(default=None)) -> Any:
        if body.request_id and idempotency_key and body.request_id != idempotency_key:
            raise HTTPException(422, "request_id and the Idempotency-Key header differ; send one of them")
        sampling = Sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                            stop=body.stop)
        ask = Ask(body.request_id or idempotency_key or uuid.uuid4().hex, body.model or settings.model_name,
                  body.prompt, body.max_tokens, sampling, body.deadline_seconds)
        try:
            answer = await submitter.submit(ask, authorization)
        except Refused as refused:
            return native_error(refused)
        return EventSourceResponse(relay(answer), ping=15)

    async def relay(answer: Live | Finished) -> AsyncIterator[dict[str, str]]:
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
                    payload = event.model_dump(mode="json",
                                               include={"request_id", "status", "finish_reason", "usage", "error"})
                    yield {"event": "done" if event.status == "completed" else "error", "data": json.dumps(payload)}
        except TimeoutError:
            yield {"event": "error",
                   "data": json.dumps({"request_id": answer.request_id, "error": "timed out waiting for the mesh"})}

    @app.get("/api/sessions/{request_id}", responses={401: {"description": "missing, unknown or revoked API key"}})
    async def get_session(request_id: str, authorization: str | None = Header(default=None)) -> Any:
        try:
            client = await accounts.authenticate(state["pool"], authorization)
        except accounts.Unauthorized as exc:
            metrics.unauthorized.inc()
            return native_error(refusal(exc))
        session = await fetch_session(state["pool"], request_id)
        if session is None or session.get("account_id") not in (None, client.account_id):
            raise HTTPException(404, f"no session {request_id!r} in the ledger (yet)")
        return jsonable_encoder(session, custom_encoder={Decimal: money.text})  # money stays exact

    @app.get("/health")
    async def health() -> JSONResponse:
        checks: dict[str, bool] = {}
        checks["broker"] = await broker.ping(timeout=2.0)
        try:
            checks["database"] = await asyncio.wait_for(state["pool"].fetchval("SELECT 1"), 2.0) == 1
        except Exception:
            checks["database"] = False
        try:
            checks["swarm"] = await asyncio.wait_for(route_check(), 10.0)
        except Exception:
            checks["swarm"] = False
        ok = all(checks.values())
        return JSONResponse(status_code=200 if ok else 503, content={"status": "ok" if ok else "unavailable", "checks": checks})

    app.state.streams = streams
    app.state.broker = broker
    app.state.submitter = submitter
    return app
