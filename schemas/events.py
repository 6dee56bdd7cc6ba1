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
    model_validator,
)

from schemas import money
SCHEMA_VERSION = 1

RequestId = Annotated[
    str,
    Field(min_length=1, max_length=192, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$",
          description="The mesh's id of one generation request, the session key everywhere: the gateway's is "
                      "`<client id>.<account id hex>` (a client's id, at most 128 characters, scoped by its account)"),
]
PeerId = Annotated[str, Field(min_length=1, max_length=128, description="libp2p peer id (base58)")]
Far = Annotated[
    Decimal,
    Field(ge=0, max_digits=38, decimal_places=18, description="FAR, exact, as a decimal string"),
    PlainSerializer(money.text, return_type=str, when_used="json"),
]
FeeRate = Annotated[
    Decimal,
    Field(ge=0, le=1, max_digits=19, decimal_places=18,
          description="Platform fee: the fraction (0..1) of a session's cost credited to the platform account"),
    PlainSerializer(money.text, return_type=str, when_used="json"),
]
AccountId = Annotated[UUID, Field(description="The client account that pays (farmesh keys; never the key itself)")]


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


StopSequence = Annotated[str, Field(min_length=1, max_length=64)]


class Sampling(BaseModel):
    """How the next token is chosen.  temperature 0 is greedy (top_p, top_k and seed then change nothing).

    Sampling draws from a random generator seeded by sha256(request_id, seed) (consumers.inference.sampling), so a
    request that is redelivered to another worker regenerates exactly the same tokens.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(default=0.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass")
    top_k: int = Field(default=0, ge=0, le=100_000, description="Keep the k most likely tokens; 0 keeps all")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Mixed with the request id")
    stop: list[StopSequence] = Field(default_factory=list, max_length=4,
                                     description="Generation ends before the first of these in the text")


class InferenceRequested(Event):
    """A client asked for a completion; published by the gateway, keyed by request_id."""

    type: Literal["inference.requested"] = "inference.requested"
    # v2: account_id and platform_fee_rate (the gateway reserved max_tokens x price on that account).
    # v3: sampling and deadline.
    schema_version: int = 3
    request_id: RequestId
    model: str
    prompt: str = Field(min_length=1, max_length=100_000)
    max_tokens: int = Field(ge=1, le=4096)
    price_per_token: Far
    account_id: AccountId
    platform_fee_rate: FeeRate = Decimal(0)
    reply_topic: str = Field(description="Topic the worker streams TokenChunk/StreamEnded events to "
                             "(the asking gateway's own: farmesh.inference.replies.<gateway id>)")
    sampling: Sampling = Field(default_factory=Sampling)
    deadline: AwareDatetime | None = Field(
        default=None, description="A worker that picks the request up later than this does not run it: "
        "the session is settled as expired and charged nothing")


class TokenChunk(Event):
    """One generated token, streamed back to the gateway as soon as it exists."""

    type: Literal["inference.token"] = "inference.token"
    request_id: RequestId
    index: int = Field(ge=0, description="0-based position among the generated tokens")
    token_id: int = Field(ge=0)
    text: str = Field(description="Text this token adds to the completion (may be empty mid-character)")


class InferenceCancelled(Event):
    """Stop generating a request: its client went away, or its gateway stopped waiting.

    Every worker reads these (no consumer group); the one running the request stops before the next
    token, and the session ends as failed, charged only the tokens delivered until then.
    """

    type: Literal["inference.cancelled"] = "inference.cancelled"
    request_id: RequestId
    reason: str = Field(max_length=500)


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    cost_far: Far


class StreamEnded(Event):
    """Last event of a reply stream: the gateway closes the client's stream with it."""

    type: Literal["inference.stream_ended"] = "inference.stream_ended"
    request_id: RequestId
    status: Literal["completed", "failed", "cancelled", "expired"]
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

    # v2: account_id, platform_fee_rate and platform_fee_far (settled by the ledger as balanced entries).
    schema_version: int = 2
    request_id: RequestId
    model: str
    account_id: AccountId
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0, description="Tokens delivered to the client")
    completion: str
    price_per_token: Far
    cost_far: Far = Field(description="completion_tokens x price_per_token: the client's debit")
    platform_fee_rate: FeeRate = Decimal(0)
    platform_fee_far: Far = Field(default=Decimal(0), description="floor(cost_far x platform_fee_rate); "
                                  "cost_far = platform_fee_far + the contributions' earnings, exactly")
    started_at: AwareDatetime
    finished_at: AwareDatetime
    worker: str
    contributions: list[Contribution]

    def contribution_events(self) -> list[NodeContribution]:
        """The `node.contribution` event of each contribution, as the worker publishes them after the outcome."""
        return [NodeContribution(event_id=c.contribution_id, request_id=self.request_id, session_event_id=self.event_id,
                                 model=self.model, peer_id=c.peer_id, start_block=c.start_block, end_block=c.end_block,
                                 tokens_processed=c.tokens_processed, earnings_far=c.earnings_far,
                                 occurred_at=self.occurred_at) for c in self.contributions]


class InferenceCompleted(SessionOutcome):
    type: Literal["inference.completed"] = "inference.completed"
    finish_reason: Literal["length", "stop"]

    @property
    def status(self) -> Literal["completed"]:
        """far_mesh_sessions.status of this outcome."""
        return "completed"


FailReason = Literal["error", "cancelled", "expired"]


class InferenceFailed(SessionOutcome):
    """Generation broke off; only delivered tokens are charged and only work used is paid."""

    type: Literal["inference.failed"] = "inference.failed"
    error: str
    # Why it ended early: the generation broke ("error"), its client went away ("cancelled"), or it was
    # picked up after its deadline and never ran ("expired"). Absent on events from before this field.
    reason: FailReason = "error"

    @property
    def status(self) -> Literal["failed", "cancelled", "expired"]:
        """far_mesh_sessions.status of this outcome."""
        return "failed" if self.reason == "error" else self.reason


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
    """A provider's node says it is alive and what it serves; keyed by peer_id.

    Signed with the node's libp2p identity key (the key behind its peer id): ``public_key`` is the
    libp2p protobuf-encoded public key (base64) and must hash to ``peer_id``; ``signature`` (base64)
    covers the canonical JSON of every other field (farmesh.swarm.identity.signing_bytes). The registry
    rejects unsigned, badly signed, stale (not newer than the last accepted one) and malformed ones.
    """

    type: Literal["node.heartbeat"] = "node.heartbeat"
    # v2: signed; adds total_blocks and interval_seconds (v1 was a sketch that never went on the wire).
    schema_version: int = 2
    peer_id: PeerId
    wallet: str = Field(min_length=1, max_length=256, description="Payout wallet of the provider")
    model: str = Field(min_length=1, max_length=256, description="The model's name in the mesh (its DHT prefix)")
    start_block: int = Field(ge=0)
    end_block: int = Field(gt=0, description="Exclusive: the node serves blocks start_block..end_block-1")
    total_blocks: int = Field(gt=0, le=100_000, description="Transformer blocks of the whole model")
    throughput: float = Field(ge=0, allow_inf_nan=False, description="Tokens/s the node announces (not money)")
    state: Literal["joining", "online", "draining", "offline"]
    version: str = Field(max_length=128)
    device: DeviceInfo
    interval_seconds: float = Field(gt=0, le=300, allow_inf_nan=False, description="Seconds between heartbeats")
    public_key: str | None = Field(default=None, max_length=4096, description="libp2p public key (protobuf, base64)")
    signature: str | None = Field(default=None, max_length=4096, description="Signature (base64) of signing_bytes")

    @model_validator(mode="after")
    def _blocks_in_model(self) -> NodeHeartbeat:
        if not self.start_block < self.end_block <= self.total_blocks:
            raise ValueError(f"blocks {self.start_block}:{self.end_block} are not a span of a "
                             f"{self.total_blocks}-block model")
        return self


class NodeTimedOut(Event):
    """The registry's decision that a node stopped sending heartbeats; keyed by peer_id.

    Published by the registry's sweep onto the heartbeat topic (so it is ordered with the node's
    heartbeats) and applied like any event: only if ``last_heartbeat_id`` is still the node's latest
    accepted heartbeat. Replaying the topic therefore rebuilds exactly the same registry.

    Signed by the registry (anyone who may produce heartbeats could otherwise take a node offline):
    ``key_id`` names the registry's Ed25519 key and ``signature`` (base64) covers the canonical JSON of
    every other field after a domain tag (consumers.registry.decisions.signing_bytes). Decisions that are
    unsigned or signed by a key the registry does not trust are dead-lettered and change nothing.
    """

    type: Literal["node.timed_out"] = "node.timed_out"
    # v2: signed by the registry (key_id, signature); v1 decisions were unsigned and are refused.
    schema_version: int = 2
    peer_id: PeerId
    last_heartbeat_id: UUID = Field(description="The latest heartbeat the registry had accepted from the node")
    last_seen: AwareDatetime = Field(description="When that heartbeat entered the log")
    timeout_seconds: float = Field(gt=0, allow_inf_nan=False)
    key_id: str | None = Field(default=None, max_length=64,
                               description="Which of the registry's keys signed it (SHA-256 of the public key, 16 hex)")
    signature: str | None = Field(default=None, max_length=256,
                                  description="Ed25519 signature (base64) of the registry over signing_bytes")


class PaymentLine(BaseModel):
    """One payout of a closed weekly batch: everything owed to one wallet."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    line_id: int = Field(ge=1, description="far_payment_batches.id")
    wallet: str
    amount_far: Far
    contributions: int = Field(ge=0)


class PaymentBatchClosed(Event):
    """A week's payment batch was closed (`farmesh payments close`); for finance consumers.

    Closing again republishes the same event (same event_id): consumers deduplicate by event_id.
    """

    type: Literal["payments.batch_closed"] = "payments.batch_closed"
    week: str = Field(pattern=r"^[0-9]{4}-W(0[1-9]|[1-4][0-9]|5[0-3])$", description="ISO week (UTC)")
    min_payout_far: Far
    lines: list[PaymentLine]
    total_far: Far = Field(description="Sum of the lines")
    carried_over_far: Far = Field(description="Owed to wallets below the minimum payout; in a later batch")
    unpaid_no_wallet_far: Far = Field(description="Earned by nodes with no registered wallet; not paid yet")
    closed_at: AwareDatetime


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
NodeEvent = Annotated[Union[NodeHeartbeat, NodeTimedOut], Field(discriminator="type")]
node_event_adapter: TypeAdapter[NodeHeartbeat | NodeTimedOut] = TypeAdapter(NodeEvent)
