"""Routes reply events from the reply topic to the HTTP stream that is waiting for them."""
from __future__ import annotations

import asyncio

from schemas.events import StreamEnded, TokenChunk


class ReplyStreams:
    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Queue[TokenChunk | StreamEnded]] = {}

    def open(self, request_id: str) -> asyncio.Queue[TokenChunk | StreamEnded]:
        if request_id in self._waiting:
            raise KeyError(request_id)
        queue: asyncio.Queue[TokenChunk | StreamEnded] = asyncio.Queue()
        self._waiting[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting

    def __len__(self) -> int:
        return len(self._waiting)

    def deliver(self, event: TokenChunk | StreamEnded) -> bool:
        """False when no stream here waits for it (another gateway's request, or a finished one)."""
        queue = self._waiting.get(event.request_id)
        if queue is None:
            return False
        queue.put_nowait(event)
        return True
