"""The thin gateway: clients publish requests and read tokens back as Server-Sent Events.

POST /api/inference/generate  {"prompt", "max_tokens", "request_id"} -> SSE: `token` events, then
                              `done` (with usage) or `error`. Needs `Authorization: Bearer KEY`:
                              401 (no/unknown/revoked key) or 402 (balance below max_tokens x price)
                              with a JSON error, and then nothing is published (producers/gateway/auth.py).
GET  /api/sessions/{id}       the recorded session and its contributions (from the ledger; the key's own)
GET  /api/nodes, /api/nodes/{peer_id}, /api/swarm, /status   discovery (producers.gateway.discovery)
GET  /health                  200 only when broker, database and a full swarm route are reachable
GET  /metrics                 Prometheus
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any, AsyncIterator, Awaitable, Callable

import asyncpg
from fastapi import FastAPI, Header, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_asgi_app,
)
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from consumers.ledger.repository import fetch_session
from farmesh import messaging, money
from farmesh.settings import Settings
from producers.gateway import auth
from producers.gateway import discovery
from producers.gateway.discovery import LiveCoverage
from producers.gateway.streams import ReplyStreams
from schemas import topics
from schemas.events import (
    InferenceCancelled,
    InferenceRequested,
    ReplyEvent,
    RequestId,
    StreamEnded,
    TokenChunk,
)

log = logging.getLogger(__name__)

RouteCheck = Callable[[], Awaitable[bool]]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=100_000)
    max_tokens: int = Field(default=100, ge=1)
    request_id: RequestId = Field(default_factory=lambda: uuid.uuid4().hex)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("farmesh_gateway_requests_total", "Generation requests", ["outcome"], registry=registry)
        self.first_token = Histogram("farmesh_gateway_time_to_first_token_seconds", "Request to first streamed token", registry=registry)
        self.tokens = Counter("farmesh_gateway_tokens_streamed_total", "Tokens streamed to clients", registry=registry)
        self.active = Gauge("farmesh_gateway_active_streams", "Open client streams", registry=registry)
        self.unauthorized = Counter("farmesh_gateway_unauthorized_total", "Requests refused with 401 (API key)", registry=registry)
        self.payment_required = Counter("farmesh_gateway_payment_required_total",
                                        "Requests refused with 402 (balance below max_tokens x price)", registry=registry)


def create_app(settings: Settings, route_check: RouteCheck, stream_timeout: float = 120.0,
               live_coverage: LiveCoverage | None = None) -> FastAPI:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    streams = ReplyStreams()
    broker = messaging.create_broker(settings.kafka_bootstrap, "gateway", registry)
    reply_topic = topics.REPLIES.name

    # No consumer group: every gateway reads every reply and keeps those of its own streams.
    @broker.subscriber(reply_topic, auto_offset_reset="latest", fetch_max_wait_ms=10, title="gateway-replies",
                       description="Token streams for the requests this gateway published")
    async def on_reply(event: ReplyEvent) -> None:
        streams.deliver(event)

    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await broker.start()
        state["pool"] = await asyncpg.create_pool(settings.require_database_url(), min_size=1, max_size=5)
        try:
            yield
        finally:
            await state["pool"].close()
            await broker.stop()

    app = FastAPI(title="Far Mesh gateway", version="0.1.0", lifespan=lifespan)
    app.mount("/metrics", make_asgi_app(registry))
    # Discovery (node registry): /api/nodes, /api/nodes/{peer_id}, /api/swarm and the /status page.
    app.include_router(discovery.router(lambda: state["pool"], settings.model_name, live_coverage))

    @app.post("/api/inference/generate", response_class=EventSourceResponse,
              responses={200: {"description": "Server-Sent Events: token*, then done or error"},
                         401: {"description": "missing, unknown or revoked API key"},
                         402: {"description": "balance below max_tokens x price"},
                         409: {"description": "request_id already used"}, 422: {"description": "invalid body"}})
    async def generate(body: GenerateRequest, authorization: str | None = Header(default=None)) -> Any:
        if body.max_tokens > settings.max_new_tokens:
            metrics.requests.labels("rejected").inc()
            raise HTTPException(422, f"max_tokens must be at most {settings.max_new_tokens}")
        pool: asyncpg.Pool = state["pool"]
        if body.request_id in streams:
            metrics.requests.labels("duplicate").inc()
            raise HTTPException(409, f"request_id {body.request_id!r} was already used")
        # The price (and fee) are fixed here, on the request; max_tokens x price is held before publishing.
        price = settings.price_for(settings.model_name)
        try:
            client, _held = await auth.accounts.reserve(pool, authorization, body.request_id, settings.model_name,
                                                        body.max_tokens, price, settings.platform_fee)
        except auth.accounts.AccountError as exc:
            if isinstance(exc, auth.accounts.Unauthorized):
                metrics.unauthorized.inc()
                metrics.requests.labels("unauthorized").inc()
            elif isinstance(exc, auth.accounts.InsufficientFunds):
                metrics.payment_required.inc()
                metrics.requests.labels("insufficient_funds").inc()
            else:
                metrics.requests.labels("duplicate").inc()
            return auth.error_response(exc)
        queue = streams.open(body.request_id)
        request = InferenceRequested(
            request_id=body.request_id, model=settings.model_name, prompt=body.prompt, max_tokens=body.max_tokens,
            price_per_token=price, reply_topic=reply_topic, account_id=client.account_id,
            platform_fee_rate=settings.platform_fee,
        )
        try:
            await messaging.publish(broker, topics.REQUESTS.name, request, request.request_id)
        except Exception as exc:
            streams.close(body.request_id)
            metrics.requests.labels("broker_error").inc()
            # Not queued (as far as we know): hold nothing. Should it have reached the log after all, the
            # ledger still settles its outcome (the debit does not depend on the reservation).
            await auth.accounts.release(pool, body.request_id, f"publish failed: {type(exc).__name__}")
            raise
        metrics.requests.labels("accepted").inc()
        return EventSourceResponse(relay(body.request_id, queue), ping=15)

    cancelling: set[asyncio.Task[None]] = set()

    def cancel(request_id: str, reason: str) -> None:
        """Tell the workers to stop a request nobody reads any more: it is charged only what was delivered."""
        event = InferenceCancelled(request_id=request_id, reason=reason)
        task = asyncio.get_running_loop().create_task(messaging.publish(broker, topics.CONTROL.name, event, request_id))
        cancelling.add(task)
        task.add_done_callback(cancel_sent)

    def cancel_sent(task: asyncio.Task[None]) -> None:
        cancelling.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:  # the worker then runs on: at-most-once
            log.warning("could not publish a cancellation: %r", exc)

    async def relay(request_id: str, queue: asyncio.Queue[TokenChunk | StreamEnded]) -> AsyncIterator[dict[str, str]]:
        start, next_index = time.monotonic(), 0
        ended, reason = False, "the client disconnected"
        metrics.active.inc()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), stream_timeout)
                except asyncio.TimeoutError:
                    reason = "the gateway stopped waiting for the mesh"
                    yield {"event": "error", "data": json.dumps({"request_id": request_id, "error": "timed out waiting for the mesh"})}
                    return
                if isinstance(event, TokenChunk):
                    if event.index != next_index:  # a redelivered request re-streams tokens already sent
                        continue
                    if next_index == 0:
                        metrics.first_token.observe(time.monotonic() - start)
                    next_index += 1
                    metrics.tokens.inc()
                    yield {"event": "token", "data": json.dumps({"index": event.index, "token_id": event.token_id, "text": event.text})}
                else:
                    ended = True
                    payload = event.model_dump(mode="json", include={"request_id", "status", "finish_reason", "usage", "error"})
                    yield {"event": "done" if event.status == "completed" else "error", "data": json.dumps(payload)}
                    return
        finally:
            streams.close(request_id)
            metrics.active.dec()
            if not ended:
                cancel(request_id, reason)

    @app.get("/api/sessions/{request_id}", responses={401: {"description": "missing, unknown or revoked API key"}})
    async def get_session(request_id: str, authorization: str | None = Header(default=None)) -> Any:
        try:
            client = await auth.accounts.authenticate(state["pool"], authorization)
        except auth.accounts.Unauthorized as exc:
            metrics.unauthorized.inc()
            return auth.error_response(exc)
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
    return app
