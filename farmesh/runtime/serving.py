"""How every service process is served: uvicorn until SIGINT/SIGTERM with a ready line, a consumer group's
ASGI app (FastStream subscribers, Prometheus /metrics with the group's lag, /health), and the set-up shared by
the groups that write to PostgreSQL (a pool, and a failed batch held while the database is away).

Each group's own entry point is `consumers/<group>/service.py`; the gateway's is `producers/gateway/service.py`.
All of them listen on 127.0.0.1 by default.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from typing import Any

import asyncpg
import uvicorn
from faststream import BaseMiddleware
from faststream.asgi import AsgiFastStream, make_ping_asgi
from prometheus_client import CollectorRegistry, make_asgi_app

from farmesh.kafka import messaging
from farmesh.kafka.lag import LagMonitor
from farmesh.runtime.settings import Settings

log = logging.getLogger(__name__)


class _StartupFailure:
    """The app, keeping the exception its startup (lifespan) failed with, so that `serve` raises it: uvicorn
    would log its traceback and exit(3), and a database or broker away at start must read as one line
    (farmesh/runtime/errors.py)."""

    def __init__(self, app) -> None:
        self.app, self.error = app, None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_quietly(message) -> None:
            if message["type"] == "lifespan.startup.failed":
                message = {**message, "message": ""}  # the traceback text uvicorn would log
            await send(message)

        try:
            await self.app(scope, receive, send_quietly)
        except Exception as exc:
            self.error = self.error or exc
            raise


class _Server(uvicorn.Server):
    """uvicorn's server, which returns after a graceful shutdown on SIGINT/SIGTERM.

    uvicorn (since 0.29) raises the signal it shut down on again once it has served, with the process's
    original handler: SIGTERM's default kills the process on the spot, so the caller's own clean-up never ran
    (the worker's and the gateway's Petals client: their DHT process and p2pd were left running after a
    `kill PID`). The signal still stops the server; `serve` then returns and the command exits normally.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()  # what uvicorn would raise again


async def serve(app, host: str, port: int, name: str) -> None:
    """Serve until SIGINT/SIGTERM (then return); print `<name> ready url=...` once listening (the supervisor
    waits for it).

    A failure to start is raised: the app's startup error, else (the port) a RuntimeError. uvicorn's own log
    lines go through the process's logging (log_config=None), in its format.
    """
    watched = _StartupFailure(app)
    server = _Server(uvicorn.Config(watched, host=host, port=port, log_level="warning", lifespan="on",
                                    log_config=None))

    async def serving() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn's exit(3): the startup failed (caught here: asyncio re-raises it from a task)
            if watched.error is not None:
                raise watched.error from None
            raise RuntimeError(f"{name} did not start on {host}:{port} (the log above says why)") from None

    task = asyncio.create_task(serving())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(f"{name} ready url=http://{host}:{port}", flush=True)
    await task


def consumer_app(broker, registry: CollectorRegistry, settings: Settings, group: str, topic: str,
                  after_startup: Sequence[Callable[[], Awaitable[None]]] = (),
                  on_shutdown: Sequence[Callable[[], Awaitable[None]]] = ()) -> AsgiFastStream:
    """The consumer group's ASGI app: subscribers, /metrics (with the group's lag) and /health."""
    lag = LagMonitor(settings.kafka_bootstrap, group, [topic], registry)
    return AsgiFastStream(
        broker,
        after_startup=[lag.start, *after_startup],
        on_shutdown=[*on_shutdown, lag.stop],
        asgi_routes=[("/metrics", make_asgi_app(registry)), ("/health", make_ping_asgi(broker, timeout=5.0))],
    )


def _background(*jobs: Callable[[], Awaitable[None]]) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """(start, stop) app hooks that run `jobs` as tasks while the service runs."""
    tasks: list[asyncio.Task] = []

    async def start() -> None:
        tasks.extend(asyncio.create_task(job()) for job in jobs)

    async def stop() -> None:
        for task in tasks:
            task.cancel()

    return start, stop


async def _wait_for_database(pool: asyncpg.Pool, max_wait: float, max_pause: float = 2.0) -> None:
    """Until `pool`'s database answers or `max_wait` seconds have passed, probing with growing pauses."""
    loop = asyncio.get_running_loop()
    deadline, pause, logged = loop.time() + max_wait, 0.1, False
    while True:
        try:
            async with asyncio.timeout(max_pause):
                await pool.fetchval("SELECT 1")
            return
        except Exception as exc:  # noqa: BLE001 - refused, reset, shutting down, starting up, timed out: "not yet"
            if not logged:
                log.warning("database unreachable (%s: %s); holding the batch until it answers",
                            type(exc).__name__, str(exc)[:200])
                logged = True
        if loop.time() + pause > deadline:
            return
        await asyncio.sleep(pause)
        pause = min(pause * 2, max_pause)


class DatabaseWait(BaseMiddleware):
    """A batch whose handling failed while the database is unreachable waits (up to `max_wait` s) for the database
    to answer again before the error rewinds it (NACK: its offsets are not committed, the batch is redelivered).

    Without it a database outage turned into a retry storm: the batch was refetched and failed again at once,
    dozens of times a second, each with a traceback. When the database does answer, nothing waits: the error
    is not the database's, and the batch is rewound at once as before.
    """

    def __init__(self, msg: Any, /, *, context: Any, pool: asyncpg.Pool, max_wait: float = 60.0) -> None:
        super().__init__(msg, context=context)
        self.pool, self.max_wait = pool, max_wait

    async def consume_scope(self, call_next: Any, msg: Any) -> Any:
        try:
            return await call_next(msg)
        except Exception:
            await _wait_for_database(self.pool, self.max_wait)
            raise


async def run_database_consumer(settings: Settings, host: str, port: int, group: str, topic: str,
                                 register: Callable[..., Sequence[Callable[[], Awaitable[None]]] | None]) -> None:
    """Serve a consumer group that writes to PostgreSQL; `register` may return background jobs to run with it."""
    await messaging.ensure_topics(settings.kafka_bootstrap, messaging.mesh_topics(settings.topic_partitions))
    pool = await asyncpg.create_pool(settings.require_database_url(), min_size=1, max_size=4)
    try:
        registry = CollectorRegistry()
        broker = messaging.create_broker(settings.kafka_bootstrap, group, registry)
        broker.add_middleware(partial(DatabaseWait, pool=pool))  # a database outage holds the batch, then rewinds it
        start, stop = _background(*(register(broker, pool, registry) or ()))
        app = consumer_app(broker, registry, settings, group, topic, after_startup=[start], on_shutdown=[stop])
        await serve(app, host, port, group)
    finally:
        await pool.close()


