"""Discovery on the gateway: who serves what, and the swarm's health (from the node registry).

GET /api/nodes?model=&state=   registered nodes (state, blocks, throughput, uptime, wallet, device, version)
GET /api/nodes/{peer_id}       one node, with tokens served and earnings so far (from the ledger) and its state history
GET /api/swarm                 per model and block: online nodes, total throughput, gaps; plus the live DHT view of
                               the gateway's own model (which servers answer, and which of them are not registered)
GET /status                    a small self-contained HTML page rendering the same (no external assets; its
                               HTML, CSS and JS are in producers/gateway/static/)

FAR amounts are exact decimal strings (schemas.money.text).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse

from db.views import nodes as node_view
from db.views.coverage import ModelHealth, model_health, swarm_health
from producers.gateway.errors import NativeError
from producers.gateway.pages import Page
from schemas import money

log = logging.getLogger(__name__)

State = Literal["joining", "online", "draining", "offline", "unknown"]
LiveCoverage = Callable[[], Awaitable[Sequence[Any]]]  # farmesh.swarm.view.BlockCoverage items
_TEXT = r"^[^\x00]*$"  # PostgreSQL text holds anything but NUL: a NUL is a 422 here, not a database error
ModelName = Annotated[str | None, Query(max_length=256, pattern=_TEXT)]
PeerIdPath = Annotated[str, Path(min_length=1, max_length=128, pattern=_TEXT)]


def _json(value: Any, status_code: int = 200) -> JSONResponse:
    return JSONResponse(jsonable_encoder(value, custom_encoder={Decimal: money.text}), status_code=status_code)


def _model_json(health: ModelHealth) -> dict[str, Any]:
    return {
        "model": health.model,
        "total_blocks": health.total_blocks,
        "online_nodes": len(health.online_peers),
        "nodes_by_state": health.nodes_by_state,
        "full_coverage": health.full_coverage,
        "gaps": health.gaps,
        "gap_ranges": [list(r) for r in health.gap_ranges],
        "min_throughput": health.min_throughput,
        "blocks": [{"block": b.block, "online_nodes": b.online_nodes, "peers": list(b.peers),
                    "throughput": b.throughput} for b in health.blocks],
    }


def router(get_pool: Callable[[], asyncpg.Pool], own_model: str, live_coverage: LiveCoverage | None = None,
           live_timeout: float = 10.0) -> APIRouter:
    api = APIRouter(tags=["discovery"])
    invalid: dict[int | str, dict[str, Any]] = {422: {"model": NativeError, "description": "invalid parameters"}}

    @api.get("/api/nodes", summary="Registered nodes, optionally by model and state", responses=invalid)
    async def list_nodes(model: ModelName = None, state: State | None = None) -> JSONResponse:
        nodes = await node_view.list_nodes(get_pool(), model, state)
        return _json({"nodes": nodes, "count": len(nodes)})

    @api.get("/api/nodes/{peer_id}", summary="One node: state, blocks, uptime, tokens served and earnings so far",
             responses={**invalid, 404: {"model": NativeError, "description": "never sent a valid heartbeat "
                                                                              "(with its unregistered_work, if any)"}})
    async def get_node(peer_id: PeerIdPath) -> JSONResponse:
        node = await node_view.get_node(get_pool(), peer_id)
        if node is None:
            work = await node_view.unregistered_work(get_pool(), peer_id)
            detail = f"no node {peer_id!r} in the registry (it never sent a valid heartbeat)"
            if work["contributions"]:
                return _json({"error": "not_found", "detail": detail, "unregistered_work": work}, status_code=404)
            raise HTTPException(404, detail)
        return _json(node)

    @api.get("/api/swarm", summary="Per model and block: online nodes, throughput and gaps")
    async def swarm() -> JSONResponse:
        spans = await node_view.node_spans(get_pool())
        models = {h.model: h for h in swarm_health(spans)}
        live: dict[str, Any] | None = None
        if live_coverage is not None:
            live = await _live_view(live_coverage, live_timeout)
            if own_model not in models and live.get("blocks"):
                models[own_model] = model_health(own_model, spans, total_blocks=len(live["blocks"]))
        out = []
        for name in sorted(models):
            entry = _model_json(models[name])
            if name == own_model and live is not None:
                registered = set(models[name].online_peers)
                live_peers = {p for b in live.get("blocks", []) for p in b["online_peers"]}
                entry["dht"] = {**live, "unregistered_peers": sorted(live_peers - registered)}
            out.append(entry)
        return _json({"models": out})

    @api.get("/status", response_class=HTMLResponse, summary="Swarm status page")
    async def status_page() -> HTMLResponse:
        return STATUS.response()

    return api


async def _live_view(live_coverage: LiveCoverage, timeout: float) -> dict[str, Any]:
    try:
        blocks = await asyncio.wait_for(live_coverage(), timeout)
    except Exception as exc:  # the DHT view is a bonus; the registry's view stands on its own
        log.warning("live DHT view unavailable: %r", exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"blocks": [{"block": b.block, "online_peers": list(b.online_peers), "throughput": b.throughput}
                       for b in blocks]}


# --------------------------------------------------------------------------------------------- /status

STATUS = Page.load("status")
STATUS_PAGE, STATUS_CSP = STATUS.html, STATUS.csp
