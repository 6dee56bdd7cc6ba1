"use strict";
// The key lives in this closure only: never in storage, cookies or the address.
let key = null;
let timer = null;
const SVG = "http://www.w3.org/2000/svg";
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}
function table(head, rows, numeric) {
  const t = el("table", {}, el("tr", {}, ...head.map((h, i) => el("th", {"class": numeric[i] ? "num" : ""}, h))));
  for (const r of rows) t.append(el("tr", {}, ...r.map((c, i) => el("td", {"class": numeric[i] ? "num" : ""}, c))));
  return t;
}
async function get(path) {
  const r = await fetch(path, {headers: {"Authorization": "Bearer " + key}, cache: "no-store"});
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.detail || body.error || ("HTTP " + r.status)) + " (" + r.status + ")");
  return body;
}
function card(label, value, id) { return el("div", {"class": "card", "id": id}, label, el("b", {}, value)); }
function days(n) {
  const out = [], today = new Date();
  for (let i = n - 1; i >= 0; i--) {
    const d = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - i));
    out.push(d.toISOString().slice(0, 10));
  }
  return out;
}
function chart(rows) {
  const byDay = new Map(rows.map(r => [r.group, r]));
  const span = days(30), W = 760, H = 220, pad = 30, slot = (W - 2 * pad) / span.length;
  const spent = span.map(d => Number(byDay.has(d) ? byDay.get(d).spent_far : 0));  // for drawing only
  const tokens = span.map(d => byDay.has(d) ? byDay.get(d).prompt_tokens + byDay.get(d).completion_tokens : 0);
  const maxS = Math.max(...spent) || 1, maxT = Math.max(...tokens) || 1;
  const box = svg("svg", {"id": "usage-chart", "viewBox": "0 0 " + W + " " + H, "width": W, "height": H,
                          "role": "img", "data-days": rows.length});
  box.append(svg("line", {"x1": pad, "y1": H - pad, "x2": W - pad, "y2": H - pad, "stroke": "#8a939c"}));
  span.forEach((d, i) => {
    const x = pad + i * slot, hs = spent[i] / maxS * (H - 2 * pad), ht = tokens[i] / maxT * (H - 2 * pad);
    const bar = svg("rect", {"x": x + 1, "y": H - pad - hs, "width": slot / 2 - 1, "height": hs, "fill": "#2f6fdb",
                             "data-day": d, "data-spent": byDay.has(d) ? byDay.get(d).spent_far : "0"});
    bar.append(svg("title", {})); bar.lastChild.textContent = d + ": " + (byDay.has(d) ? byDay.get(d).spent_far : "0") + " FAR";
    box.append(bar);
    box.append(svg("rect", {"x": x + slot / 2, "y": H - pad - ht, "width": slot / 2 - 1, "height": ht,
                            "fill": "#e8a33d", "data-day": d, "data-tokens": tokens[i]}));
    if (i % 5 === 0 || i === span.length - 1) {
      const label = svg("text", {"x": x, "y": H - pad + 14, "font-size": 10, "fill": "#66707a"});
      label.textContent = d.slice(5);
      box.append(label);
    }
  });
  const top = svg("text", {"x": pad, "y": pad - 8, "font-size": 11, "fill": "#2f6fdb"});
  top.textContent = "max " + maxS + " FAR / " + maxT + " tokens a day";
  box.append(top);
  return box;
}
function limitText(v) { return v === null ? "none" : String(v); }
async function refresh() {
  const since = new Date(Date.now() - 30 * 86400e3).toISOString();
  try {
    const [account, usage, sessions] = await Promise.all([
      get("/api/account"), get("/api/usage?group_by=day&since=" + encodeURIComponent(since)),
      get("/api/account/sessions?limit=20")]);
    document.getElementById("error").textContent = "";
    document.getElementById("account").hidden = false;
    document.getElementById("summary").replaceChildren(
      card("account", account.name, "c-name"), card("balance, FAR", account.balance_far, "balance"),
      card("reserved, FAR", account.reserved_far, "reserved"), card("available, FAR", account.available_far, "available"),
      card("spent in 30 days, FAR", usage.total.spent_far, "spent"),
      card("sessions in 30 days", usage.total.sessions, "sessions-total"));
    document.getElementById("chart").replaceChildren(chart(usage.rows));
    const l = account.limits, u = account.key.usage;
    document.getElementById("limits").replaceChildren(table(["limit", "value", "used"], [
      ["requests per minute", limitText(l.requests_per_minute), u.requests_this_minute],
      ["tokens per minute", limitText(l.tokens_per_minute), u.tokens_this_minute],
      ["budget per month, FAR", limitText(l.monthly_budget_far), u.spent_this_month_far]], [false, true, true]));
    document.getElementById("sessions").replaceChildren(table(
      ["request", "model", "status", "tokens", "cost, FAR", "finished", "key"],
      sessions.sessions.map(s => [s.request_id, s.model, s.status, s.prompt_tokens + " + " + s.completion_tokens,
                                  s.cost_far, s.finished_at || "", s.key || ""]),
      [false, false, false, true, true, false, false]));
    document.getElementById("credits").replaceChildren(table(["when", "FAR", "id", "description"],
      account.credits.map(c => [c.at, c.amount_far, c.credit_id || "", c.description]), [false, true, false, false]));
    document.getElementById("updated").textContent = "updated " + new Date().toISOString();
  } catch (e) {
    document.getElementById("error").textContent = e.message;
  }
}
document.getElementById("login").addEventListener("submit", ev => {
  ev.preventDefault();
  const input = document.getElementById("key");
  key = input.value.trim();
  input.value = "";
  if (timer !== null) clearInterval(timer);
  if (!key) { key = null; return; }
  refresh();
  timer = setInterval(refresh, 10000);
});
