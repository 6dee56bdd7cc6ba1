"""Every Kafka topic of the mesh, what flows on it, and how it is keyed.

Keys decide ordering: everything about one session is keyed by its request_id, so a
session's completion and its contributions arrive in order on one partition.
"""
from __future__ import annotations

from dataclasses import dataclass

from schemas import events


# Every record of ours names its event type (`type`) in this header, so a reader can skip a type unparsed.
EVENT_TYPE_HEADER = "event-type"


@dataclass(frozen=True)
class Topic:
    name: str
    key: str
    carries: tuple[type[events.Event], ...]
    description: str
    compacted: bool = False
    # Topic configs set when the topic is created (farmesh.kafka.messaging.ensure_topics); an existing topic is
    # left as it is (`kafka-configs --alter` changes one).
    config: tuple[tuple[str, str], ...] = ()


REQUESTS = Topic(
    "farmesh.inference.requests", "request_id", (events.InferenceRequested,),
    "Generation requests from gateways; consumer group `inference` runs them on the Petals swarm.",
)
CONTROL = Topic(
    "farmesh.inference.control", "request_id", (events.InferenceCancelled,),
    "Cancellations from gateways (client gone); every worker reads them (no group) and stops that request.",
)
REPLIES = Topic(
    "farmesh.inference.replies", "request_id", (events.TokenChunk, events.StreamEnded),
    "Tokens streamed back to the gateway that asked. Each gateway instance has its own reply topic, "
    "farmesh.inference.replies.<gateway id> (reply_topic()), named in every request it publishes, and is "
    "its only reader: any number of gateways and workers run at once and each stream reaches its client.",
)
SESSIONS = Topic(
    "farmesh.sessions", "request_id",
    (events.InferenceCompleted, events.InferenceFailed, events.NodeContribution),
    "Finished sessions and per-node contributions; consumer groups `ledger` and `payments`.",
)
HEARTBEATS = Topic(
    "farmesh.nodes.heartbeats", "peer_id", (events.NodeHeartbeat, events.NodeTimedOut),
    "Signed provider heartbeats and the registry's signed time-out decisions (one partition order per peer); "
    "consumer group `registry`.",
    # The registry judges skew and silence by each record's log time: the broker's clock, never the producer's.
    config=(("message.timestamp.type", "LogAppendTime"),),
)
PAYMENTS = Topic(
    "farmesh.payments", "week", (events.PaymentBatchClosed,),
    "Closed weekly payment batches (one line per payout wallet) for finance consumers.",
)
DEAD_LETTER = Topic(
    "farmesh.deadletter", "original key", (events.DeadLetter,),
    "Records a consumer rejected, with the reason; nothing is dropped silently.",
)


def reply_topic(gateway_id: str) -> str:
    """The reply topic of the gateway instance `gateway_id` (created by that gateway when it starts)."""
    return f"{REPLIES.name}.{gateway_id}"


ALL: tuple[Topic, ...] = (REQUESTS, CONTROL, REPLIES, SESSIONS, HEARTBEATS, PAYMENTS, DEAD_LETTER)

# Consumer groups (one per concern, so each scales and replays on its own).
GROUP_INFERENCE = "inference"
GROUP_LEDGER = "ledger"
GROUP_PAYMENTS = "payments"
GROUP_REGISTRY = "registry"
