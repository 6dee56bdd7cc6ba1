"""What every gateway API does with a generation request, whatever its shape (native or OpenAI).

0. Authenticate the key (401) before anything else: an unknown caller costs no chat rendering, no tokenization
   and no database write, whatever it sent.
1. Check it: a model this gateway serves (404), a prompt within max_prompt_tokens and max_tokens within
   max_new_tokens (400), a deadline within bounds. Rendering a chat (the prompt may be a callable) and
   tokenizing run on a small thread pool of their own, never on the event loop: other requests go on meanwhile,
   and a burst of big prompts cannot take the default executor the swarm checks run on.
2. Reserve max_tokens x price on the caller's account (the Accounts port; farmesh.billing.accounts.reserve in
   production): 401 / 402, 429 when the model already has max_pending_requests pending over all gateways or the
   key is over one of its limits (requests or tokens per minute, monthly budget: farmesh.billing.limits), and
   idempotency: the same account repeating a request id (or Idempotency-Key) with the same parameters gets that
   request's stream (if this gateway still streams it) or its recorded result; with other parameters, 422.
   Request ids are private to an account: the client's id is scoped by its account (mesh_request_id), and that
   mesh id is what is reserved, published, streamed and settled. Another account's identical id is another
   request: it can neither see nor block this one. Whatever the client reads names its own id.
3. Publish InferenceRequested, naming this gateway's own reply topic, and hand back the live stream.
A client that goes away before the end cancels the request (when it was the stream's last reader): the
worker stops before its next token and the ledger charges only the tokens delivered.

The database and the broker are reached only through the ports of producers.gateway.ports (Accounts, Sessions,
Publisher), so these rules run in unit tests against in-memory fakes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field, ValidationError

from farmesh.billing.accounts import (AccountError, AlreadyRequested, DuplicateRequest, Existing,
                                     InsufficientFunds, ParametersDiffer, QueueFull, RateLimited, Reservation,
                                     Unauthorized, mesh_request_id)
from farmesh.runtime.settings import Settings
from producers.gateway.errors import excerpt
from producers.gateway.guard import MAX_PROMPT_CHARS
from producers.gateway.ports import Accounts, Publisher, Sessions
from producers.gateway.streams import ReplyEvent, ReplyStream, ReplyStreams
from schemas import money
from schemas.events import InferenceCancelled, InferenceRequested, Sampling, StreamEnded, TokenChunk, Usage

log = logging.getLogger(__name__)


# What a client may name its request (`request_id`, `Idempotency-Key`): the mesh's id (schemas.events.RequestId)
# adds `.<account id hex>` to it (farmesh.billing.accounts.mesh_request_id).
CLIENT_ID_MAX_LENGTH = 128
ClientRequestId = Annotated[
    str,
    Field(min_length=1, max_length=CLIENT_ID_MAX_LENGTH, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$",
          description="The client's id of one generation request (its idempotency key), private to its account"),
]


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Ask:
    """One generation request as every API states it."""

    request_id: str  # the client's id (scoped by its account on submit: the mesh knows it as mesh_request_id)
    model: str
    # The prompt, or what renders it (a chat): called off the event loop, and only once the key is known.
    prompt: str | Callable[[], str]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    deadline_seconds: float | None = None  # None: settings.request_deadline

    def fingerprint(self) -> str:
        """sha256 of what decides the generated tokens: a repeated id must ask for the same thing."""
        if not isinstance(self.prompt, str):
            raise TypeError("render the prompt first (Submitter.prepare)")
        canonical = json.dumps({"model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens,
                                "sampling": self.sampling.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


class Refused(Exception):
    """A request the gateway does not accept: an HTTP status, a machine code and a message for people."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                 native: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}
        self.extra = extra or {}
        self.native = native or code  # the native API's `error` (OpenAI's code unless the native one differs)


@dataclass(frozen=True)
class Finished:
    """A repeated request whose session the ledger has already recorded."""

    request_id: str  # the client's id
    status: str  # completed | failed | cancelled | expired
    finish_reason: str
    completion: str
    usage: Usage
    error: str | None


@dataclass
class Live:
    """A request being generated now; read it with Submitter.follow()."""

    request_id: str  # the client's id (the stream's is the mesh's)
    stream: ReplyStream
    started: float = field(default_factory=time.monotonic)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("farmesh_gateway_requests_total", "Generation requests", ["outcome"], registry=registry)
        self.first_token = Histogram("farmesh_gateway_time_to_first_token_seconds", "Request to first streamed token",
                                     buckets=(.005, .01, .025, .05, .075, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                     registry=registry)
        self.tokens = Counter("farmesh_gateway_tokens_streamed_total", "Tokens streamed to clients", registry=registry)
        self.active = Gauge("farmesh_gateway_active_streams", "Open client streams", registry=registry)
        self.unauthorized = Counter("farmesh_gateway_unauthorized_total", "Requests refused with 401 (API key)",
                                    registry=registry)
        self.payment_required = Counter("farmesh_gateway_payment_required_total",
                                        "Requests refused with 402 (balance below max_tokens x price)", registry=registry)
        self.rate_limited = Counter("farmesh_gateway_rate_limited_total",
                                    "Requests refused with 429 (the model's pending requests at their bound, or the key's limits)",
                                    registry=registry)


# account error -> HTTP status, OpenAI's error code, the native API's error (also the metrics outcome label)
_ACCOUNT_ERRORS: list[tuple[type[AccountError], int, str, str]] = [
    (Unauthorized, 401, "invalid_api_key", "unauthorized"),
    (InsufficientFunds, 402, "insufficient_quota", "insufficient_funds"),
    (QueueFull, 429, "rate_limit_exceeded", "rate_limited"),
    (RateLimited, 429, "rate_limit_exceeded", "rate_limited"),  # the key's own limits (farmesh.billing.limits)
    (ParametersDiffer, 422, "idempotency_key_reused", "parameters_differ"),
    (DuplicateRequest, 409, "request_id_conflict", "request_id_conflict"),  # a session with no reservation
]


def refusal(exc: AccountError) -> Refused:
    """The HTTP refusal for an account error (its `native` error name is the outcome label it counts under)."""
    for kind, status, code, outcome in _ACCOUNT_ERRORS:
        if isinstance(exc, kind):
            headers: dict[str, str] = {}
            extra: dict[str, Any] = {}
            if isinstance(exc, Unauthorized):
                headers["WWW-Authenticate"] = 'Bearer realm="farmesh"'
            elif isinstance(exc, InsufficientFunds):
                extra = {"required_far": money.text(money.to_far(exc.required)),
                         "available_far": money.text(money.to_far(exc.available))}
            elif isinstance(exc, QueueFull):
                headers["Retry-After"] = str(exc.retry_after)
            elif isinstance(exc, RateLimited):
                headers["Retry-After"] = str(exc.retry_after)
                extra = {"limit": exc.limit}
            param = "request_id" if status in (409, 422) else None
            return Refused(status, code, str(exc), param=param, headers=headers, extra=extra, native=outcome)
    return Refused(400, "refused", str(exc))


class Submitter:
    def __init__(self, settings: Settings, accounts: Accounts, sessions: Sessions, publisher: Publisher,
                 streams: ReplyStreams, metrics: Metrics, tokenizer: Tokenizer, reply_topic: str,
                 stream_timeout: float) -> None:
        self.settings, self.accounts, self.sessions, self.publisher = settings, accounts, sessions, publisher
        self.streams = streams
        self.metrics, self.tokenizer, self.reply_topic = metrics, tokenizer, reply_topic
        self.stream_timeout = stream_timeout
        self._cancelling: set[asyncio.Task[None]] = set()
        self._work: ThreadPoolExecutor | None = None  # prompt rendering and tokenization (started when needed)

    @property
    def models(self) -> list[str]:
        return [self.settings.model_name]

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the gateway's small prompt pool (a few threads: bounded CPU, never the event loop)."""
        if self._work is None:
            self._work = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                            thread_name_prefix="farmesh-prompts")
        return await asyncio.get_running_loop().run_in_executor(self._work, functools.partial(fn, *args))

    async def prepare(self, ask: Ask) -> Ask:
        """The ask with its prompt rendered (off the event loop); a rendering refusal is raised as is."""
        if isinstance(ask.prompt, str):
            return ask
        return dataclasses.replace(ask, prompt=await self.off_loop(ask.prompt))

    async def check(self, ask: Ask) -> None:
        """Refuse what no worker would run (the prompt rendered: see prepare)."""
        if ask.model not in self.models:
            raise Refused(404, "model_not_found", f"model {excerpt(ask.model)} does not exist here; "
                          f"this mesh serves {', '.join(map(repr, self.models))} (GET /v1/models)", param="model")
        if not 1 <= ask.max_tokens <= self.settings.max_new_tokens:
            # The native API bounds max_tokens only here: an integer of thousands of digits is quoted by its length.
            got = str(ask.max_tokens)
            got = got if len(got) <= 20 else f"a number of {len(got)} digits"
            raise Refused(400, "invalid_value", f"max_tokens must be at most {self.settings.max_new_tokens} "
                          f"(and at least 1), got {got}", param="max_tokens")
        if ask.deadline_seconds is not None and not 0 < ask.deadline_seconds <= self.settings.max_request_deadline:
            raise Refused(400, "invalid_value", f"the deadline must be between 0 and "
                          f"{self.settings.max_request_deadline} seconds", param="deadline")
        assert isinstance(ask.prompt, str)
        if not ask.prompt:
            raise Refused(400, "invalid_value", "the prompt is empty", param="prompt")
        if len(ask.prompt) > MAX_PROMPT_CHARS:  # a rendered chat adds its template's text to the messages
            raise Refused(400, "context_length_exceeded", f"the prompt is {len(ask.prompt)} characters; this "
                          f"mesh takes at most {MAX_PROMPT_CHARS}", param="prompt")
        prompt_tokens = len(await self.off_loop(self.tokenizer.encode, ask.prompt))
        if prompt_tokens > self.settings.max_prompt_tokens:
            raise Refused(400, "context_length_exceeded", f"the prompt is {prompt_tokens} tokens; this mesh takes at "
                          f"most {self.settings.max_prompt_tokens}", param="prompt")

    def _refused(self, exc: AccountError) -> Refused:
        """The refusal for an account error, counted."""
        refused = refusal(exc)
        self.metrics.requests.labels(refused.native).inc()
        if refused.status == 401:
            self.metrics.unauthorized.inc()
        elif refused.status == 402:
            self.metrics.payment_required.inc()
        elif refused.status == 429:
            self.metrics.rate_limited.inc()
        return refused

    async def submit(self, ask: Ask, authorization: str | None) -> Live | Finished:
        received = time.monotonic()  # time to first token counts from here: checks and reservation included
        try:
            client = await self.accounts.authenticate(authorization)  # first: an unknown key costs nothing
        except AccountError as exc:
            raise self._refused(exc) from exc
        mesh_id = mesh_request_id(client.account_id, ask.request_id)  # the client's id, private to its account
        price = self.settings.price_for(ask.model)
        try:
            ask = await self.prepare(ask)
            await self.check(ask)
            deadline = datetime.now(timezone.utc) + timedelta(
                seconds=ask.deadline_seconds or self.settings.request_deadline)
            # Built (and so validated) before anything is held: an event that cannot exist is refused here.
            request = self._event(ask, mesh_id, client.account_id, price, deadline)
        except Refused:
            self.metrics.requests.labels("invalid").inc()
            raise
        reservation = Reservation(
            mesh_id, ask.model, ask.max_tokens, price, self.settings.platform_fee,
            request_hash=ask.fingerprint(), deadline=deadline,
            max_pending=self.settings.max_pending_requests, retry_after=self.settings.retry_after,
            limits=client.limits,  # the key's limits: checked and counted with the reservation, over every gateway
            reply_topic=self.reply_topic)  # a worker streams the tokens only to this gateway
        try:
            await self.accounts.reserve(authorization, reservation)  # checks the key again, in its transaction
        except AlreadyRequested as exc:
            self.metrics.requests.labels("repeated").inc()
            return await self._existing(exc.existing, ask.request_id)
        except AccountError as exc:
            raise self._refused(exc) from exc
        stream = self.streams.open(mesh_id)
        try:
            await self.publisher.request(request)
        except Exception as exc:
            self.streams.close(mesh_id)
            self.metrics.requests.labels("broker_error").inc()
            # Not queued (as far as we know): hold nothing. Should it have reached the log after all, the
            # ledger still settles its outcome (the debit does not depend on the reservation).
            await self.accounts.release(mesh_id, f"publish failed: {type(exc).__name__}")
            raise Refused(503, "service_unavailable", "the request could not be queued; retry shortly",
                          headers={"Retry-After": "1"}) from exc
        self.metrics.requests.labels("accepted").inc()
        return Live(ask.request_id, stream, started=received)

    def _event(self, ask: Ask, mesh_id: str, account_id: Any, price: Any, deadline: datetime) -> InferenceRequested:
        try:
            return InferenceRequested(
                request_id=mesh_id, model=ask.model, prompt=ask.prompt, max_tokens=ask.max_tokens,
                price_per_token=price, reply_topic=self.reply_topic, account_id=account_id,
                platform_fee_rate=self.settings.platform_fee, sampling=ask.sampling, deadline=deadline,
            )
        except ValidationError as exc:
            first = exc.errors()[0] if exc.errors() else {}
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise Refused(400, "invalid_value", f"{param or 'request'}: {str(first.get('msg', 'invalid'))[:200]}",
                          param=param) from None

    async def _existing(self, existing: Existing, client_id: str) -> Live | Finished:
        """The answer to a repeated request (existing: its mesh id; client_id: what the client calls it): its live
        stream here, else its recorded session."""
        if (stream := self.streams.get(existing.request_id)) is not None:
            return Live(client_id, stream)
        session = await self.sessions.fetch(existing.request_id)
        if session is None and existing.status == "released":
            # Released without a session: it was never queued (the publish failed); it will never have a result.
            raise Refused(409, "request_not_queued", f"request {client_id!r} could not be queued earlier "
                          "and was not charged; send it again with a new request_id / Idempotency-Key",
                          param="request_id")
        # Streamed by another gateway (or by this one before a restart): wait for the ledger's record.
        give_up = time.monotonic() + self.stream_timeout
        if existing.deadline is not None:
            give_up = max(give_up, time.monotonic() + (existing.deadline - datetime.now(timezone.utc)).total_seconds())
        while session is None:
            if time.monotonic() > give_up:
                raise Refused(504, "timeout", f"request {client_id!r} was accepted but has no result yet; "
                              "retry later", headers={"Retry-After": "5"})
            await asyncio.sleep(0.25)
            session = await self.sessions.fetch(existing.request_id)
        return Finished(
            request_id=client_id, status=session["status"],
            finish_reason=session.get("finish_reason") or "error", completion=session["completion"],
            usage=Usage(prompt_tokens=session["prompt_tokens"], completion_tokens=session["completion_tokens"],
                        cost_far=session["cost"]),
            error=session.get("error"),
        )

    async def follow(self, live: Live) -> AsyncIterator[ReplyEvent]:
        """The request's events, first to last; a reader that leaves early as the last one cancels it.

        Raises TimeoutError after stream_timeout seconds without an event (the request is then cancelled).
        """
        stream = live.stream
        stream.readers += 1
        self.metrics.active.inc()
        reason = "the client disconnected"
        try:
            async for event in stream.follow(self.stream_timeout):
                if isinstance(event, TokenChunk):
                    if event.index == 0 and not stream.first_token_seen:  # once per request, by its first reader
                        stream.first_token_seen = True
                        self.metrics.first_token.observe(time.monotonic() - live.started)
                    self.metrics.tokens.inc()
                yield event
        except TimeoutError:
            reason = "the gateway stopped waiting for the mesh"
            raise
        finally:
            stream.readers -= 1
            self.metrics.active.dec()
            if stream.readers == 0:
                self.streams.close(stream.request_id)
                if not stream.ended:
                    self.cancel(stream.request_id, reason)

    def cancel(self, request_id: str, reason: str) -> None:
        """Tell the workers to stop a request nobody reads any more: it is charged only what was delivered."""
        event = InferenceCancelled(request_id=request_id, reason=reason)
        task = asyncio.get_running_loop().create_task(self.publisher.cancel(event))
        self._cancelling.add(task)
        task.add_done_callback(self._cancel_sent)

    def _cancel_sent(self, task: asyncio.Task[None]) -> None:
        self._cancelling.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:  # the worker then runs on: at-most-once
            log.warning("could not publish a cancellation: %r", exc)

    async def drain(self) -> None:
        """Wait for cancellations still being published, then stop the prompt pool (at shutdown)."""
        if self._cancelling:
            await asyncio.gather(*self._cancelling, return_exceptions=True)
        if self._work is not None:
            self._work.shutdown(wait=False, cancel_futures=True)
            self._work = None


RouteCheck = Callable[[], Awaitable[bool]]
__all__ = ["Ask", "CLIENT_ID_MAX_LENGTH", "ClientRequestId", "Finished", "Live", "Metrics", "Refused", "RouteCheck", "StreamEnded", "Submitter", "refusal"]
