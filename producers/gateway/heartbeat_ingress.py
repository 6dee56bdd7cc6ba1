"""POST /api/nodes/heartbeats: the one way a provider's node reaches the mesh's Kafka, for its own heartbeats only.

A provider on another machine holds no broker credentials at all (`farmesh node --heartbeat-url`): it POSTs each
signed heartbeat here, and the gateway publishes the received bytes unchanged (key: the peer id) to
farmesh.nodes.heartbeats, where the registry checks them again exactly as it checks any record. Before publishing,
in this order (each refusal one JSON error, nothing published):

- 413 a body over FARMESH_HEARTBEAT_MAX_BYTES (decided from Content-Length, or as the bytes arrive);
- 415 not declared JSON; 422 not strict JSON;
- 403 `not_a_heartbeat`: anything but a `node.heartbeat` (an `inference.completed`, a `node.timed_out`, ...): the
  ingress is no path to the sessions, requests, replies or payments topics, nor to the registry's own decisions;
- 422 not a valid v2 heartbeat, or `stale`: its time further than FARMESH_HEARTBEAT_MAX_SKEW from the gateway's
  clock;
- 401 `bad_signature`: unsigned, or its key is not the peer id's, or the signature does not verify (the same check
  as the registry's, farmesh.swarm.identity.verify_payload);
- 429 `rate_limited` (with Retry-After): more than FARMESH_HEARTBEAT_RATE per second from one (verified) peer, beyond
  a burst of FARMESH_HEARTBEAT_BURST; counted after the signature, so nobody can use up another peer's allowance.

202 {"accepted": true, "peer_id", "event_id"} once the broker acknowledged the record.
"""
from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from farmesh.swarm.identity import SignatureError, verify_payload
from producers.gateway import errors
from producers.gateway.guard import strict_loads
from producers.gateway.rate_limit import TokenBuckets
from schemas.events import NodeHeartbeat

PATH = "/api/nodes/heartbeats"
HEARTBEAT_SCHEMA_VERSION = 2  # what the registry reads (consumers/registry/consumer.py)

PublishHeartbeat = Callable[[str, bytes], Awaitable[None]]  # (peer id, the body as received)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge
    return bytes(body)


def router(publish: PublishHeartbeat, registry: CollectorRegistry, *, max_bytes: int, rate: float, burst: float,
           max_skew: float, clock: Callable[[], float] = time.monotonic,
           wall_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> APIRouter:
    api = APIRouter()
    limits = TokenBuckets(rate=rate, burst=burst)
    outcomes = Counter("farmesh_gateway_heartbeats_total", "Heartbeats posted to the ingress, by result",
                       ["result"], registry=registry)

    def refuse(status: int, code: str, message: str, **headers: str) -> errors.AsciiJSONResponse:
        outcomes.labels(code).inc()
        return errors.response(PATH, status, message, code, headers=headers)

    @api.post(PATH, status_code=202, tags=["providers"],
              summary="A provider node's signed heartbeat, published unchanged to the heartbeat topic",
              responses={s: {"model": errors.NativeError} for s in (401, 403, 413, 415, 422, 429)})
    async def post_heartbeat(request: Request) -> errors.AsciiJSONResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return refuse(415, "unsupported_media_type", "send the heartbeat as application/json")
        try:
            body = await _read_body(request, max_bytes)
        except _TooLarge:
            return refuse(413, "request_too_large",
                          f"a heartbeat is at most {max_bytes} bytes (FARMESH_HEARTBEAT_MAX_BYTES)")
        try:
            payload = strict_loads(body)
        except json.JSONDecodeError as exc:
            return refuse(422, "invalid_request", f"body: not valid JSON ({exc.msg})")
        kind = payload.get("type") if isinstance(payload, dict) else None
        if kind != "node.heartbeat":
            return refuse(403, "not_a_heartbeat", f"this endpoint takes node.heartbeat events only, not "
                                                   f"{errors.excerpt(kind if isinstance(kind, str) else type(payload).__name__)}")
        try:
            heartbeat = NodeHeartbeat.model_validate(payload)
        except ValidationError as exc:
            found = exc.errors()
            items = errors.problems(found)
            return refuse(422, "invalid_request", errors.summary(items, len(found) - len(items)))
        if heartbeat.schema_version != HEARTBEAT_SCHEMA_VERSION:
            return refuse(422, "invalid_request", f"schema_version: {heartbeat.schema_version} is not "
                                                  f"{HEARTBEAT_SCHEMA_VERSION}")
        skew = abs((wall_clock() - heartbeat.occurred_at).total_seconds())
        if skew > max_skew:
            return refuse(422, "stale", f"occurred_at is {skew:.0f} s from the gateway's clock (at most "
                                        f"{max_skew:g}: FARMESH_HEARTBEAT_MAX_SKEW)")
        try:
            verify_payload(payload)  # the very object that will be published
        except SignatureError as exc:
            return refuse(401, "bad_signature", f"signature: {exc}")
        wait = limits.take(heartbeat.peer_id, clock())
        if wait > 0:
            return refuse(429, "rate_limited", f"peer {heartbeat.peer_id} sends heartbeats faster than {rate:g}/s",
                          **{"Retry-After": str(max(1, round(wait + 0.5)))})
        await publish(heartbeat.peer_id, body)
        outcomes.labels("accepted").inc()
        return errors.AsciiJSONResponse({"accepted": True, "peer_id": heartbeat.peer_id,
                                         "event_id": str(heartbeat.event_id)}, status_code=202)

    return api
