"""Consumer group `inference`: runs generation requests on the Petals swarm.

Tokens are streamed to the request's reply topic as they are produced.  At the end the worker
publishes one session outcome (completed or failed) carrying every node's contribution, then one
NodeContribution event per (node, block span), then closes the reply stream with usage.
The offset is committed only after all of that was published; a worker that dies mid-generation
leaves the request to be redelivered (the ledger ignores a second outcome for the same session).
A request cancelled on farmesh.inference.control (its client went away) stops before its next token
and ends as cancelled: only the tokens delivered until then are charged. A request picked up after its
deadline is not run: it ends as expired and is charged nothing.

Only what the gateway reserved is run. Anyone who can write to the requests topic can publish a well-formed
request (with no reservation, another account, 100x the price); so before anything else the handler reads the
request's reservation through its `Reservations` port (consumers/inference/ports.py) and runs the request only
if it matches an OPEN reservation: same account, model, price and fee rate, max_tokens within what was reserved
(farmesh/billing/acceptance.py `request_problem`). Otherwise the request is dead-lettered with the reason: not
run, nothing published for it, nothing charged. That includes a request redelivered after its outcome was
settled (its reservation is closed): it already ran. A worker therefore needs the database (`farmesh worker`
refuses to start without FARMESH_DATABASE_URL).

Concurrency: `concurrency` consumers of the group run in one worker process, each with its own partitions of
the requests topic and one generation at a time, committing its offsets only after the request's outcome is
published (FastStream's partition-concurrent subscriber). Sampling is seeded by the request id, so a request
redelivered after a crash regenerates exactly the tokens its client already received.

The group is a FastStream `KafkaRouter` (`InferenceRouter`): its two subscribers and the publishers it declares
for everything it emits. The handlers are plain functions; what they need (the generator, the model served, the
metrics, the router's publishers) is a `Worker` that `register()` puts in the broker's context, where their
`Context(WORKER)` parameter finds it. A router belongs to one broker and its subscribers' options are fixed when
declared, so `register()` declares one per broker with the worker's concurrency and fetch wait (a test runs two
workers in one process); the module's `router` is the group as declared by default, which the AsyncAPI document
(consumers/asyncapi.py) describes. Replies go to each request's own reply topic (one per gateway,
farmesh.inference.replies.<gateway id>) through the declared `replies` publisher, the topic given per record.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Protocol, Sequence, Union

from faststream import Context
from faststream.kafka import KafkaBroker, KafkaMessage, KafkaRouter
from faststream.kafka.publisher import DefaultPublisher
from faststream.middlewares import AckPolicy
from prometheus_client import CollectorRegistry, Counter, Histogram

from consumers.inference.ports import Reservations
from consumers.inference.settlement import settle
from farmesh.billing.acceptance import request_problem
from farmesh.billing.pricing import Work
from farmesh.kafka import messaging
from schemas import topics
from schemas.events import (
    FailReason,
    InferenceCancelled,
    InferenceCompleted,
    InferenceFailed,
    InferenceRequested,
    NodeContribution,
    Sampling,
    StreamEnded,
    TokenChunk,
    Usage,
    default_source,
)

log = logging.getLogger(__name__)

OnToken = Callable[[int, int, str], None]


class Generated(Protocol):
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    spans: Sequence[Work]


class Generator(Protocol):
    """What the worker needs from the Petals client (consumers.inference.generation.MeshClient)."""

    def generate_stream(self, prompt: str, max_new_tokens: int, on_token: OnToken, sampling: Sampling | None = None,
                        seed_key: str = "") -> Generated: ...


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.sessions = Counter("farmesh_worker_sessions_total", "Finished sessions", ["model", "status"], registry=registry)
        self.tokens = Counter("farmesh_worker_tokens_total", "Generated tokens streamed", ["model"], registry=registry)
        self.first_token = Histogram("farmesh_worker_time_to_first_token_seconds", "Request start to first token", ["model"], registry=registry)
        self.duration = Histogram("farmesh_worker_generation_seconds", "Whole generation", ["model"], registry=registry)
        self.node_tokens = Counter("farmesh_node_tokens_total", "Tokens processed per node", ["peer_id"], registry=registry)
        self.refused = Counter("farmesh_worker_refused_requests_total",
                               "Requests dead-lettered unrun: they match no open reservation", registry=registry)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class RequestCancelled(RuntimeError):
    """The request was cancelled (inference.cancelled): generation stops before the next token."""


class RequestExpired(RuntimeError):
    """The request was picked up after its deadline: it is not run."""


class Cancellations:
    """Request ids cancelled recently (bounded), from the control topic; read by the generation thread."""

    def __init__(self, keep: int = 10_000) -> None:
        self._reasons: OrderedDict[str, str] = OrderedDict()
        self._keep = keep

    def add(self, request_id: str, reason: str) -> None:
        self._reasons[request_id] = reason
        while len(self._reasons) > self._keep:
            self._reasons.popitem(last=False)

    def reason(self, request_id: str) -> str | None:
        return self._reasons.get(request_id)


class TokenRelay:
    """Carries tokens from the generation thread to Kafka, in order, as they appear."""

    def __init__(self, replies: DefaultPublisher, request: InferenceRequested, loop: asyncio.AbstractEventLoop,
                 cancellations: Cancellations | None = None) -> None:
        self._replies, self._request, self._loop = replies, request, loop
        self._cancellations = cancellations
        self._queue: asyncio.Queue[tuple[int, int, str] | None] = asyncio.Queue()
        self.delivered = 0
        self.text = ""
        self.first_token_at: float | None = None
        self._task = loop.create_task(self._run())

    def on_token(self, index: int, token_id: int, text: str) -> None:  # called from the generation thread
        if self._cancellations is not None and (reason := self._cancellations.reason(self._request.request_id)):
            raise RequestCancelled(f"cancelled: {reason}")  # this token is not delivered, nor any later one
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, token_id, text))

    async def _run(self) -> None:
        request = self._request
        while (item := await self._queue.get()) is not None:
            index, token_id, text = item
            chunk = TokenChunk(request_id=request.request_id, index=index, token_id=token_id, text=text)
            await messaging.publish_through(self._replies, chunk, request.request_id, topic=request.reply_topic)
            if self.first_token_at is None:
                self.first_token_at = self._loop.time()
            self.delivered += 1
            self.text += text

    async def close(self) -> None:
        self._queue.put_nowait(None)
        await self._task


WORKER = "inference_worker"  # the key of the handlers' Worker in their broker's context
# The group's membership on Apache Kafka (classic protocol): a worker that dies without leaving (SIGKILL, a lost
# machine) keeps its partitions until the broker has heard no heartbeat from it for SESSION_TIMEOUT_MS; then the
# group rebalances and its requests, uncommitted, go to a live worker. A client is waiting on each of them, so the
# session is the broker's shortest (group.min.session.timeout.ms, 6 s), heartbeats every 2 s (a third of it, as
# Kafka advises: two may be missed). Generation runs in a thread (asyncio.to_thread), so a busy worker still
# heartbeats; max_poll_interval_ms (30 min) bounds a generation, not the liveness check. The other groups keep
# aiokafka's 10 s / 3 s: a few seconds more before their backlog moves costs nobody a stream.
SESSION_TIMEOUT_MS = 6_000
HEARTBEAT_INTERVAL_MS = 2_000


@dataclass
class Worker:
    """What the group's handlers need, bound to one broker's context by `register()`."""

    generator: Generator
    model: str
    name: str  # the `source` of the outcomes this worker publishes
    metrics: Metrics
    outcomes: DefaultPublisher  # the router's declared publishers (InferenceRouter)
    replies: DefaultPublisher
    reservations: Reservations  # what the gateway reserved: a request is run only if it matches an open one
    cancellations: Cancellations = field(default_factory=Cancellations)


async def on_cancel(event: InferenceCancelled, worker: Worker = Context(WORKER)) -> None:
    """Remember a cancellation: the request stops before its next token (or does not start)."""
    worker.cancellations.add(event.request_id, event.reason)


async def run_inference(request: InferenceRequested, message: KafkaMessage, broker: KafkaBroker = Context(),
                        worker: Worker = Context(WORKER)) -> None:
    """Run one request: stream its tokens, then publish its outcome and contributions, then end its stream.
    A request that matches no open reservation is dead-lettered instead, and nothing else happens."""
    problem = request_problem(request, await worker.reservations.reservation(request.request_id))
    if problem is not None:
        await messaging.send_dead_letter(broker, topics.GROUP_INFERENCE, message.raw_message, f"not run: {problem}")
        worker.metrics.refused.inc()
        return
    loop = asyncio.get_running_loop()
    started_at, t0 = _now(), loop.time()
    relay = TokenRelay(worker.replies, request, loop, worker.cancellations)
    error: str | None = None
    ended_as: FailReason = "error"
    result: Generated | None = None
    try:
        if (reason := worker.cancellations.reason(request.request_id)) is not None:
            raise RequestCancelled(f"cancelled before it started: {reason}")
        if request.deadline is not None and started_at > request.deadline:
            raise RequestExpired(f"picked up {(started_at - request.deadline).total_seconds():.1f} s after "
                                 "its deadline; not run")
        if request.model != worker.model:
            raise ValueError(f"this worker serves model {worker.model!r}, not {request.model!r}")
        result = await asyncio.to_thread(worker.generator.generate_stream, request.prompt, request.max_tokens,
                                         relay.on_token, sampling=request.sampling, seed_key=request.request_id)
    except Exception as exc:  # the generation broke: settle what was delivered, nothing more
        error = f"{type(exc).__name__}: {exc}"
        result = getattr(exc, "partial", None)
        if isinstance(exc, RequestExpired):
            ended_as = "expired"
        elif isinstance(exc, RequestCancelled) or isinstance(exc.__cause__, RequestCancelled):
            ended_as = "cancelled"
        log.warning("request %s %s: %s", request.request_id, "failed" if ended_as == "error" else ended_as, error)
    finally:
        await relay.close()

    spans = list(result.spans) if result is not None else []
    prompt_tokens = result.prompt_tokens if result is not None else 0
    outcome, contributions = settle(
        request, relay.delivered, prompt_tokens, relay.text, spans, started_at, worker.name,
        result.finish_reason if result is not None and error is None else None, error, ended_as,
    )
    await messaging.publish_through(worker.outcomes, outcome, request.request_id)
    for event in contributions:
        await messaging.publish_through(worker.outcomes, event, request.request_id)
    ended = StreamEnded(
        request_id=request.request_id,
        status=outcome.status,
        finish_reason=outcome.finish_reason if isinstance(outcome, InferenceCompleted) else "error",
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=relay.delivered, cost_far=outcome.cost_far),
        error=error,
    )
    await messaging.publish_through(worker.replies, ended, request.request_id, topic=request.reply_topic)

    metrics = worker.metrics
    metrics.sessions.labels(request.model, outcome.status).inc()
    metrics.tokens.labels(request.model).inc(relay.delivered)
    metrics.duration.labels(request.model).observe(loop.time() - t0)
    if relay.first_token_at is not None:
        metrics.first_token.labels(request.model).observe(relay.first_token_at - t0)
    for c in outcome.contributions:
        metrics.node_tokens.labels(c.peer_id).inc(c.tokens_processed)


class InferenceRouter(KafkaRouter):
    """The group: its subscribers, with the worker's concurrency and fetch wait, and its declared publishers."""

    def __init__(self, *, concurrency: int = 1, fetch_wait_ms: int = 3) -> None:
        super().__init__()
        self.outcomes = self.publisher(
            topics.SESSIONS.name, title=f"{topics.SESSIONS.name}:{topics.GROUP_INFERENCE}",
            schema=Union[InferenceCompleted, InferenceFailed, NodeContribution],
            description="Each request's outcome, then one node.contribution per (node, block span), keyed by "
                        "request id",
        )
        self.replies = self.publisher(
            topics.REPLIES.name, title=f"{topics.REPLIES.name}:{topics.GROUP_INFERENCE}",
            schema=Union[TokenChunk, StreamEnded],
            description="A request's tokens as they come, then its end with usage, to the request's own "
                        "reply_topic: farmesh.inference.replies.<gateway id>, one per gateway",
        )
        self.dead_letters = messaging.declare_dead_letters(
            self, topics.GROUP_INFERENCE,
            "Requests and cancellations that do not validate against their schema, and requests that "
            "match no open reservation (not run), with why",
        )
        # No consumer group: every worker hears every cancellation and stops the request if it runs it.
        # Fetch waits: a request must start at once (fetch_wait_ms, see Settings.latency_fetch_wait_ms); a
        # cancellation within one token (tens of ms), so 10 ms spares the CPU an idle dev-broker consumer burns.
        self.subscriber(
            topics.CONTROL.name, auto_offset_reset="latest", fetch_max_wait_ms=max(fetch_wait_ms, 10),
            title="worker-control", description="Cancellations: stop a request whose client went away",
        )(on_cancel)
        self.subscriber(
            topics.REQUESTS.name, group_id=topics.GROUP_INFERENCE, auto_offset_reset="earliest",
            ack_policy=AckPolicy.NACK_ON_ERROR, max_poll_interval_ms=30 * 60 * 1000, fetch_max_wait_ms=fetch_wait_ms,
            session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
            max_workers=concurrency, title="inference", description="Runs a generation request on the Petals swarm",
        )(run_inference)


router = InferenceRouter()  # the group as declared by default (the AsyncAPI document); register() makes its own


def register(broker: KafkaBroker, generator: Generator, model: str, registry: CollectorRegistry, *,
             reservations: Reservations, worker_name: str | None = None, concurrency: int = 1,
             fetch_wait_ms: int = 3) -> InferenceRouter:
    """The group on `broker`: a router of its own included, its `Worker` in the broker's context. `reservations`
    is required: a worker that cannot check what the gateway reserved would run anything it is sent."""
    group = InferenceRouter(concurrency=concurrency, fetch_wait_ms=fetch_wait_ms)
    broker.context.set_global(WORKER, Worker(generator, model, worker_name or default_source(), Metrics(registry),
                                             group.outcomes, group.replies, reservations))
    broker.include_router(group)
    return group
