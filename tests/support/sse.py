"""A minimal Server-Sent Events reader for tests (event name + JSON data)."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
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


def iter_events(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """The same parse over a synchronous stream's lines (httpx's `iter_lines`), each event as it arrives."""
    name, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
