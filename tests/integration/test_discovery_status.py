"""/status in a real headless browser (Debian's chromium): the page runs its script and renders the registry.

Skipped when /usr/bin/chromium is missing (install: `apt-get install -y chromium`; `make install-browser`).
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import shutil
import subprocess
import tempfile
from html import unescape
from pathlib import Path

import pytest

from tests.integration.test_registry import INTERVAL, TIMEOUT, Env, _when, env, eventually  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason="needs a headless browser: apt-get install -y chromium (or make install-browser)")


def render(url: str, budget_ms: int = 8000) -> str:
    """The DOM after the page loaded and its script ran (virtual time: fetches complete before the budget ends)."""
    with tempfile.TemporaryDirectory(prefix="farmesh-chromium-") as profile:
        # Its own process group, so a browser that hangs is stopped with all of its helper processes.
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            out, err = browser.communicate(timeout=90)
        finally:
            try:
                os.killpg(browser.pid, signal.SIGKILL)  # helpers that outlive the main process
            except ProcessLookupError:
                pass
            browser.wait()
    assert browser.returncode == 0, err[-2000:]
    return out


def attribute(dom: str, tag_attr: str, name: str) -> list[str]:
    return re.findall(rf'{tag_attr}="[^"]*"[^>]*?{name}="([^"]*)"', dom)


@needs_chromium
async def test_status_page_renders_the_swarm_in_a_browser(env: Env) -> None:  # noqa: F811 (the fixture)
    a = env.node("a", 0, 2, "wallet-a")
    b = env.node("b", 2, 4, "<img src=x onerror=alert(1)>")  # provider-supplied text stays text
    for node in (a, b):
        await node.beat("online")
    a.start()
    b.start()
    await eventually(lambda: _when(env.http.get("/api/nodes", params={"state": "online", "model": env.model}),
                                   lambda r: r.json()["count"] == 2), "both online")
    url = str(env.http.base_url).rstrip("/") + "/status"

    dom = await asyncio.to_thread(render, url)
    assert 'data-rendered="' in dom, dom[-3000:]  # the script ran (the CSP hash admits it)
    section = re.search(rf'<section class="model" data-model="{env.model}"[^>]*>', dom)
    assert section, dom[-3000:]
    assert 'data-gaps=""' in section.group(0) and 'data-online-nodes="2"' in section.group(0)
    assert f"{env.model} \u2014 2 online nodes, 4 blocks, full coverage" in unescape(dom)
    rows = dict(re.findall(r'<tr data-peer="([^"]+)" data-state="([^"]+)"', dom))
    assert rows[a.peer_id] == rows[b.peer_id] == "online"
    assert "<img" not in dom.split("<body", 1)[1] and "&lt;img src=x onerror=alert(1)&gt;" in dom

    await asyncio.sleep(INTERVAL * 2)
    await b.kill()
    await eventually(lambda: _when(env.http.get("/api/swarm"), lambda r: any(
        m["model"] == env.model and m["gaps"] == [2, 3] for m in r.json()["models"])), "a gap",
        timeout=TIMEOUT + 20)
    dom = await asyncio.to_thread(render, url)
    section = re.search(rf'<section class="model" data-model="{env.model}"[^>]*>', dom)
    assert section and 'data-gaps="2,3"' in section.group(0) and 'data-online-nodes="1"' in section.group(0)
    assert f"{env.model} \u2014 1 online node, 4 blocks, gaps: blocks 2\u20133" in unescape(dom)
    assert re.findall(r'class="block gap" data-block="(\d)"', dom) == ["2", "3"]
    rows = dict(re.findall(r'<tr data-peer="([^"]+)" data-state="([^"]+)"', dom))
    assert rows[b.peer_id] == "offline" and rows[a.peer_id] == "online"
