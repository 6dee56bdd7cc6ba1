"""Run the project's ASGI apps inside a test's event loop, on a free 127.0.0.1 port."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import uvicorn

from farmesh.dev.local_services import free_port


@contextlib.asynccontextmanager
async def serve(app) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
