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
function short(peer) { return peer.length > 14 ? peer.slice(0, 6) + "\u2026" + peer.slice(-6) : peer; }
function ranges(rs) { return rs.map(([a, b]) => b - a > 1 ? a + "\u2013" + (b - 1) : String(a)).join(", "); }
function renderModel(m) {
  const status = m.full_coverage ? "full coverage" : "gaps: blocks " + ranges(m.gap_ranges);
  const box = el("section", {"class": "model", "data-model": m.model, "data-gaps": m.gaps.join(","),
                             "data-online-nodes": m.online_nodes},
    el("h2", {}, m.model + " \u2014 " + m.online_nodes + " online node" + (m.online_nodes === 1 ? "" : "s") +
       ", " + m.total_blocks + " blocks, " + status));
  const strip = el("div", {"class": "blocks"});
  for (const b of m.blocks) {
    const cls = b.online_nodes === 0 ? "gap" : b.online_nodes === 1 ? "thin" : "ok";
    strip.append(el("div", {"class": "block " + cls, "data-block": b.block, "data-online": b.online_nodes,
                            "title": "block " + b.block + ": " + b.online_nodes + " online, " +
                                     b.throughput.toFixed(1) + " tok/s\n" + b.peers.join("\n")},
                    String(b.block), el("br"), "\u00d7" + b.online_nodes));
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
    note.textContent = "updated " + new Date().toLocaleTimeString() + " \u00b7 " + nodes.count + " nodes";
    document.body.dataset.rendered = String(Number(document.body.dataset.rendered || 0) + 1);
  } catch (e) {
    note.className = "err";
    note.textContent = "could not load: " + e.message;
  }
}
refresh();
setInterval(refresh, 5000);
