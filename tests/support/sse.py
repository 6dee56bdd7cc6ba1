"""A minimal Server-Sent Events reader for tests (event name + JSON data)."""
from __future__ import annotations

import json
from typing import Any

import httpx


async def read_events(response: httpx.Response) -> list[tuple[str, Any]]:
    events, name, data = [], "message", []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                events.append((name, json.loads("\n".join(data))))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return events
