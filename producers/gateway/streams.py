"""Routes reply events from this gateway's reply topic to the HTTP streams waiting for them.

A request's stream keeps every event it received, so a client that repeats the request id while it runs
(a retry) joins the same generation from its first token: nothing is generated or charged twice. Tokens
are kept in order by index; a redelivered request (another worker after a crash) regenerates the same
tokens (sampling is seeded by the request id) and its repeats of tokens already received are dropped.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from schemas.events import StreamEnded, TokenChunk

ReplyEvent = TokenChunk | StreamEnded


class ReplyStream:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.events: list[ReplyEvent] = []
        self.readers = 0
        self.first_token_seen = False  # the gateway's time-to-first-token metric counts each request once
        self._next_index = 0
        self._arrived = asyncio.Event()

    @property
    def ended(self) -> bool:
        return bool(self.events) and isinstance(self.events[-1], StreamEnded)

    @property
    def tokens(self) -> int:
        return self._next_index

    def add(self, event: ReplyEvent) -> None:
        if self.ended:
            return
        if isinstance(event, TokenChunk):
            if event.index != self._next_index:  # a repeat from a redelivered run (or a gap: never skip ahead)
                return
            self._next_index += 1
        self.events.append(event)
        self._arrived.set()
        self._arrived = asyncio.Event()

    async def follow(self, timeout: float) -> AsyncIterator[ReplyEvent]:
        """Every event from the first, then live ones until the end; TimeoutError after `timeout` s of silence."""
        seen = 0
        while True:
            while seen < len(self.events):
                event = self.events[seen]
                seen += 1
                yield event
                if isinstance(event, StreamEnded):
                    return
            arrived = self._arrived
            await asyncio.wait_for(arrived.wait(), timeout)


class ReplyStreams:
    """The streams of the requests this gateway published and still serves."""

    def __init__(self) -> None:
        self._streams: dict[str, ReplyStream] = {}

    def open(self, request_id: str) -> ReplyStream:
        if request_id in self._streams:
            raise KeyError(request_id)
        stream = self._streams[request_id] = ReplyStream(request_id)
        return stream

    def get(self, request_id: str) -> ReplyStream | None:
        return self._streams.get(request_id)

    def close(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def deliver(self, event: ReplyEvent) -> bool:
        """False when no stream here waits for it (a finished or forgotten request)."""
        stream = self._streams.get(event.request_id)
        if stream is None:
            return False
        stream.add(event)
        return True
