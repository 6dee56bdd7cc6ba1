"""The thin gateway: clients publish requests and read tokens back as Server-Sent Events.

POST /api/inference/generate  {"prompt", "max_tokens", "request_id", sampling...} -> SSE: `token` events,
                              then `done` (with usage) or `error`. Needs `Authorization: Bearer KEY`.
GET  /api/sessions/{id}       the recorded session and its contributions (from the ledger; the key's own)
                              (both: producers.gateway.native_api)
POST /v1/completions, /v1/chat/completions, GET /v1/models   OpenAI-compatible (producers.gateway.openai_api)
GET  /api/nodes, /api/nodes/{peer_id}, /api/swarm, /status   discovery (producers.gateway.discovery)
GET  /api/account, /api/usage, /api/account/sessions, /account   the key's own account (producers.gateway.account_api)
     /api/admin/...           the operator's API, with FARMESH_ADMIN_TOKEN (producers.gateway.admin_api)
POST /api/nodes/heartbeats    a provider's signed heartbeat, published unchanged to the heartbeat topic
                              (producers.gateway.heartbeat_ingress: the only thing providers may send)
GET  /health                  200 only when broker, database and a full swarm route are reachable
GET  /metrics                 Prometheus

Every API goes through producers.gateway.submit (checks, reservation, idempotency, bounded queue). Tokens come
back on this gateway's own reply topic, farmesh.inference.replies.<gateway id>, which only it reads: any
number of gateways run side by side and every stream reaches the client that asked.

This module only composes: the pool and the broker (opened in the lifespan), their adapters
(producers.gateway.ports), the reply streams, the Submitter, the routers, metrics, /health, the body limit
(producers.gateway.guard) and the error handlers: every refusal in its API's shape (producers.gateway.errors),
an invalid body included, quoting none of the input.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.exceptions import HTTPException as StarletteHTTPException

from farmesh.kafka import messaging
from farmesh.runtime.settings import Settings
from producers.gateway import account_api, admin_api, discovery, errors, heartbeat_ingress, native_api, openai_api
from producers.gateway.discovery import LiveCoverage
from producers.gateway.guard import BodyLimit
from producers.gateway.ports import KafkaPublisher, PostgresAccounts
from producers.gateway.streams import ReplyStreams
from producers.gateway.submit import Metrics, RouteCheck, Submitter, Tokenizer
from schemas import topics
from schemas.events import ReplyEvent

log = logging.getLogger(__name__)


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
    @broker.subscriber(reply_topic, auto_offset_reset="latest", fetch_max_wait_ms=settings.latency_fetch_wait_ms,
                       title="gateway-replies", description="Token streams for the requests this gateway published")
    async def on_reply(event: ReplyEvent) -> None:
        streams.deliver(event)

    state: dict[str, Any] = {}

    def pool() -> asyncpg.Pool:
        return state["pool"]

    database = PostgresAccounts(pool)  # the Accounts and the Sessions port
    publisher = KafkaPublisher(broker)
    submitter = Submitter(settings, database, database, publisher, streams, metrics,
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
            await submitter.drain()  # and stops its prompt pool
            await state["pool"].close()
            await broker.stop()

    app = FastAPI(title="Far Mesh gateway", version="0.2.0", lifespan=lifespan,
                  description="Pay-per-token generation on the Far Mesh Petals swarm: a native SSE API and an "
                              "OpenAI-compatible one (/v1). Authenticate with `Authorization: Bearer <farmesh key>`.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.mount("/metrics", make_asgi_app(registry))
    # Discovery (node registry): /api/nodes, /api/nodes/{peer_id}, /api/swarm and the /status page.
    app.include_router(heartbeat_ingress.router(
        publisher.heartbeat, registry, max_bytes=settings.heartbeat_max_bytes, rate=settings.heartbeat_rate,
        burst=settings.heartbeat_burst, max_skew=settings.heartbeat_max_skew))
    app.include_router(discovery.router(pool, settings.model_name, live_coverage))
    app.include_router(openai_api.router(submitter, route_check))
    app.include_router(native_api.router(submitter, database, database))
    # The client's own account (/api/account, /api/usage, the /account page) and the operator's API (/api/admin/,
    # off without FARMESH_ADMIN_TOKEN).
    app.include_router(account_api.router(pool, metrics.unauthorized.inc))
    token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
    app.include_router(admin_api.router(pool, token))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Never FastAPI's default: it echoes the whole input, and cannot encode a NaN or a lone surrogate (a 500).
        if errors.is_openai(request.url.path):
            return openai_api.validation_response(exc)
        found = exc.errors()
        items = errors.problems(found)
        return errors.response(request.url.path, 422, errors.summary(items, len(found) - len(items)),
                               "invalid_request", errors=items)

    @app.exception_handler(StarletteHTTPException)  # Starlette's: also what FastAPI raises for an unparsable body
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return errors.response(request.url.path, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        checks: dict[str, bool] = {}
        checks["broker"] = await broker.ping(timeout=2.0)
        try:
            checks["database"] = await asyncio.wait_for(pool().fetchval("SELECT 1"), 2.0) == 1
        except Exception:
            checks["database"] = False
        try:
            checks["swarm"] = await asyncio.wait_for(route_check(), 10.0)
        except Exception:
            checks["swarm"] = False
        ok = all(checks.values())
        return JSONResponse(status_code=200 if ok else 503,
                            content={"status": "ok" if ok else "unavailable", "checks": checks})

    app.state.streams = streams
    app.state.broker = broker
    app.state.submitter = submitter
    return app
