"""Every event that crosses Kafka.  JSON on the wire (pydantic v2), one envelope for all:
a unique ``event_id``, a ``type`` discriminator, a ``schema_version``, the time it happened
and the ``source`` that emitted it.  Amounts of FAR are Decimals, serialized as JSON strings
so no tool rounds them through a float.
"""
from __future__ import annotations

import os
import socket
from datetime import datetime, timezone
from decimal import Decimal
from typing import Annotated, Literal, Union
from uuid import UUID, uuid4

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
)

from farmesh import money

SCHEMA_VERSION = 1

RequestId = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$",
          description="Client-chosen id of one generation request; the session key everywhere"),
]
PeerId = Annotated[str, Field(min_length=1, max_length=128, description="libp2p peer id (base58)")]
Far = Annotated[
    Decimal,
    Field(ge=0, max_digits=38, decimal_places=18, description="FAR, exact, as a decimal string"),
    PlainSerializer(money.text, return_type=str, when_used="json"),
]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def default_source() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: UUID = Field(default_factory=uuid4)
    schema_version: int = SCHEMA_VERSION
    occurred_at: AwareDatetime = Field(default_factory=_now)
    source: str = Field(default_factory=default_source, max_length=256)


class InferenceRequested(Event):
    """A client asked for a completion; published by the gateway, keyed by request_id."""

    type: Literal["inference.requested"] = "inference.requested"
    request_id: RequestId
    model: str
    prompt: str = Field(min_length=1, max_length=100_000)
    max_tokens: int = Field(ge=1, le=4096)
    price_per_token: Far
    reply_topic: str = Field(description="Topic the worker streams TokenChunk/StreamEnded events to")


class TokenChunk(Event):
    """One generated token, streamed back to the gateway as soon as it exists."""

    type: Literal["inference.token"] = "inference.token"
    request_id: RequestId
    index: int = Field(ge=0, description="0-based position among the generated tokens")
    token_id: int = Field(ge=0)
    text: str = Field(description="Text this token adds to the completion (may be empty mid-character)")


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    cost_far: Far


class StreamEnded(Event):
    """Last event of a reply stream: the gateway closes the client's stream with it."""

    type: Literal["inference.stream_ended"] = "inference.stream_ended"
    request_id: RequestId
    status: Literal["completed", "failed"]
    finish_reason: Literal["length", "stop", "error"]
    usage: Usage
    error: str | None = None


class Contribution(BaseModel):
    """Which node served which blocks for how many tokens, and what that earned.

    Taken from the client-side Petals session spans, never from what a node claims.
    ``contribution_id`` is also the event id of the matching NodeContribution event.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    contribution_id: UUID
    peer_id: PeerId
    start_block: int = Field(ge=0)
    end_block: int = Field(gt=0)
    tokens_processed: int = Field(ge=0)
    earnings_far: Far


class SessionOutcome(Event):
    """A finished session with everything the ledger records, in one event.

    Contributions travel inside it so the ledger writes a session and its contributions
    atomically; a redelivered request that runs again produces a second outcome for the same
    request_id, which the ledger recognises and ignores (nothing is charged twice).
    """

    request_id: RequestId
    model: str
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0, description="Tokens delivered to the client")
    completion: str
    price_per_token: Far
    cost_far: Far = Field(description="completion_tokens x price_per_token")
    started_at: AwareDatetime
    finished_at: AwareDatetime
    worker: str
    contributions: list[Contribution]


class InferenceCompleted(SessionOutcome):
    type: Literal["inference.completed"] = "inference.completed"
    finish_reason: Literal["length", "stop"]


class InferenceFailed(SessionOutcome):
    """Generation broke off; only delivered tokens are charged and only work used is paid."""

    type: Literal["inference.failed"] = "inference.failed"
    error: str


class NodeContribution(Event):
    """One node's work for one session over one block span; for payments and analytics.

    Its event_id equals the ``contribution_id`` inside the session outcome it belongs to.
    """

    type: Literal["node.contribution"] = "node.contribution"
    request_id: RequestId
    session_event_id: UUID = Field(description="event_id of the InferenceCompleted/Failed it belongs to")
    model: str
    peer_id: PeerId
    start_block: int = Field(ge=0)
    end_block: int = Field(gt=0)
    tokens_processed: int = Field(ge=0)
    earnings_far: Far


class DeviceInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["cpu", "cuda", "mps", "other"]
    name: str = ""
    memory_bytes: int = Field(default=0, ge=0)


class NodeHeartbeat(Event):
    """A provider's node says it is alive and what it serves (verified by the registry)."""

    type: Literal["node.heartbeat"] = "node.heartbeat"
    peer_id: PeerId
    wallet: str = Field(min_length=1, max_length=256)
    model: str
    start_block: int = Field(ge=0)
    end_block: int = Field(gt=0)
    throughput: float = Field(ge=0, description="Tokens/s the node announces (not money)")
    state: Literal["joining", "online", "draining", "offline"]
    version: str
    device: DeviceInfo
    public_key: str | None = None
    signature: str | None = None


class DeadLetter(Event):
    """A record a consumer could not accept, with why; the original bytes are kept verbatim."""

    type: Literal["deadletter"] = "deadletter"
    consumer_group: str
    original_topic: str
    partition: int
    offset: int
    key: str | None
    payload: str
    reason: str


ReplyEvent = Annotated[Union[TokenChunk, StreamEnded], Field(discriminator="type")]
SessionEvent = Annotated[Union[InferenceCompleted, InferenceFailed, NodeContribution], Field(discriminator="type")]

reply_event_adapter: TypeAdapter[TokenChunk | StreamEnded] = TypeAdapter(ReplyEvent)
session_event_adapter: TypeAdapter[InferenceCompleted | InferenceFailed | NodeContribution] = TypeAdapter(SessionEvent)
