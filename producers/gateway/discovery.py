"""Discovery on the gateway: who serves what, and the swarm's health (from the node registry).

GET /api/nodes?model=&state=   registered nodes (state, blocks, throughput, uptime, wallet, device, version)
GET /api/nodes/{peer_id}       one node, with tokens served and earnings so far (from the ledger) and its state history
GET /api/swarm                 per model and block: online nodes, total throughput, gaps; plus the live DHT view of
                               the gateway's own model (which servers answer, and which of them are not registered)
GET /status                    a small self-contained HTML page rendering the same (no external assets)

FAR amounts are exact decimal strings (schemas.money.text).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any, Literal

import asyncpg
from fastapi import APIRouter, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse

from db.views import nodes as node_view
from db.views.coverage import ModelHealth, model_health, swarm_health
from schemas import money
log = logging.getLogger(__name__)

State = Literal["joining", "online", "draining", "offline", "unknown"]
LiveCoverage = Callable[[], Awaitable[Sequence[Any]]]  # farmesh.swarm.view.BlockCoverage items


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

    @api.get("/api/nodes", summary="Registered nodes, optionally by model and state")
    async def list_nodes(model: str | None = None, state: State | None = None) -> JSONResponse:
        nodes = await node_view.list_nodes(get_pool(), model, state)
        return _json({"nodes": nodes, "count": len(nodes)})

    @api.get("/api/nodes/{peer_id}", summary="One node: state, blocks, uptime, tokens served and earnings so far")
    async def get_node(peer_id: str) -> JSONResponse:
        node = await node_view.get_node(get_pool(), peer_id)
        if node is None:
            work = await node_view.unregistered_work(get_pool(), peer_id)
            detail = f"no node {peer_id!r} in the registry (it never sent a valid heartbeat)"
            if work["contributions"]:
                return _json({"detail": detail, "unregistered_work": work}, status_code=404)
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
        return HTMLResponse(STATUS_PAGE, headers={"Content-Security-Policy": STATUS_CSP,
                                                  "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

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

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1d2329;background:#f7f8fa}
h1{font-size:1.3rem;margin:0 0 .2rem}h2{font-size:1.05rem;margin:1.4rem 0 .4rem}
.muted{color:#66707a}.err{color:#b00020}
.model{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:.8rem 1rem;margin:1rem 0}
.blocks{display:flex;flex-wrap:wrap;gap:3px;margin:.5rem 0}
.block{min-width:2.2rem;padding:.25rem .2rem;text-align:center;border-radius:4px;font-size:12px}
.block.ok{background:#cdeccf}.block.thin{background:#fbe7b5}.block.gap{background:#f6c4c4;font-weight:600}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #e6e9ed;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{font-weight:600;background:#eef1f4}code{font-size:12px}
.state{border-radius:10px;padding:0 .5rem;font-size:12px}
.state.online{background:#cdeccf}.state.joining,.state.draining{background:#fbe7b5}.state.offline{background:#e3e5e8}
"""

# Everything is built with textContent/createElement: wallets, versions and device names come from providers.
_SCRIPT = """
"use strict";
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
function duration(s) {
  s = Math.round(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m ? m + "m " + (s % 60) + "s" : s + "s";
}
function short(peer) { return peer.length > 14 ? peer.slice(0, 6) + "\\u2026" + peer.slice(-6) : peer; }
function ranges(rs) { return rs.map(([a, b]) => b - a > 1 ? a + "\\u2013" + (b - 1) : String(a)).join(", "); }
function renderModel(m) {
  const status = m.full_coverage ? "full coverage" : "gaps: blocks " + ranges(m.gap_ranges);
  const box = el("section", {"class": "model", "data-model": m.model, "data-gaps": m.gaps.join(","),
                             "data-online-nodes": m.online_nodes},
    el("h2", {}, m.model + " \\u2014 " + m.online_nodes + " online node" + (m.online_nodes === 1 ? "" : "s") +
       ", " + m.total_blocks + " blocks, " + status));
  const strip = el("div", {"class": "blocks"});
  for (const b of m.blocks) {
    const cls = b.online_nodes === 0 ? "gap" : b.online_nodes === 1 ? "thin" : "ok";
    strip.append(el("div", {"class": "block " + cls, "data-block": b.block, "data-online": b.online_nodes,
                            "title": "block " + b.block + ": " + b.online_nodes + " online, " +
                                     b.throughput.toFixed(1) + " tok/s\\n" + b.peers.join("\\n")},
                    String(b.block), el("br"), "\\u00d7" + b.online_nodes));
  }
  box.append(strip, el("div", {"class": "muted"}, "bottleneck throughput " + m.min_throughput.toFixed(1) +
                                                   " tok/s; nodes by state: " + JSON.stringify(m.nodes_by_state)));
  if (m.dht) {
    if (m.dht.error) box.append(el("div", {"class": "err"}, "live DHT view unavailable: " + m.dht.error));
    else if (m.dht.unregistered_peers.length)
      box.append(el("div", {"class": "err", "data-unregistered": m.dht.unregistered_peers.join(",")},
                    "serving without a valid heartbeat (not routed to, not paid): " +
                    m.dht.unregistered_peers.map(short).join(", ")));
  }
  return box;
}
function renderNodes(nodes) {
  const head = el("tr", {}, ...["node", "model", "state", "blocks", "throughput", "uptime", "wallet", "device",
                                "version", "last seen"].map(h => el("th", {}, h)));
  const table = el("table", {"id": "nodes"}, el("thead", {}, head));
  const body = el("tbody");
  for (const n of nodes) {
    const dev = n.device ? (n.device.kind + (n.device.name ? " " + n.device.name : "") +
                            (n.device.memory_bytes ? ", " + (n.device.memory_bytes / 2 ** 30).toFixed(1) + " GiB" : "")) : "";
    body.append(el("tr", {"data-peer": n.peer_id, "data-state": n.state},
      el("td", {"title": n.peer_id}, el("code", {}, short(n.peer_id))), el("td", {}, n.model || ""),
      el("td", {}, el("span", {"class": "state " + n.state}, n.state)),
      el("td", {}, n.start_block + ":" + n.end_block), el("td", {}, (n.throughput || 0).toFixed(1)),
      el("td", {}, duration(n.uptime_seconds || 0)), el("td", {}, el("code", {}, n.wallet || "")),
      el("td", {}, dev), el("td", {"class": "muted"}, n.version || ""),
      el("td", {"class": "muted"}, n.last_seen ? new Date(n.last_seen).toLocaleTimeString() : "")));
  }
  table.append(body);
  return table;
}
async function refresh() {
  const note = document.getElementById("updated");
  try {
    const [swarm, nodes] = await Promise.all(["api/swarm", "api/nodes"].map(async path => {
      const r = await fetch(path, {cache: "no-store"});
      if (!r.ok) throw new Error(path + ": HTTP " + r.status);
      return r.json();
    }));
    const models = document.getElementById("models");
    models.replaceChildren(...swarm.models.map(renderModel));
    if (!swarm.models.length) models.append(el("p", {"class": "muted"}, "no nodes registered yet"));
    document.getElementById("node-list").replaceChildren(renderNodes(nodes.nodes));
    note.className = "muted";
    note.textContent = "updated " + new Date().toLocaleTimeString() + " \\u00b7 " + nodes.count + " nodes";
    document.body.dataset.rendered = String(Number(document.body.dataset.rendered || 0) + 1);
  } catch (e) {
    note.className = "err";
    note.textContent = "could not load: " + e.message;
  }
}
refresh();
setInterval(refresh, 5000);
"""


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


STATUS_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Far Mesh \u2014 swarm status</title><style>{_STYLE}</style></head>
<body>
<h1>Far Mesh \u2014 swarm status</h1>
<div id="updated" class="muted">loading\u2026</div>
<noscript><p class="err">This page needs JavaScript; the same data is at <a href="api/swarm">/api/swarm</a>
and <a href="api/nodes">/api/nodes</a>.</p></noscript>
<div id="models"></div>
<h2>Nodes</h2>
<div id="node-list"></div>
<script>{_SCRIPT}</script>
</body></html>
"""

# Only this page's own inline script and style run; data comes from this origin only.
STATUS_CSP = (f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
              "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
