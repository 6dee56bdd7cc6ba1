"""The AsyncAPI document of the mesh, generated from schemas/ (`farmesh docs asyncapi`)."""
from __future__ import annotations

from typing import Union

from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI

from schemas import topics

GROUPS = {
    topics.REQUESTS.name: [topics.GROUP_INFERENCE],
    topics.SESSIONS.name: [topics.GROUP_LEDGER, topics.GROUP_PAYMENTS],
    topics.HEARTBEATS.name: [topics.GROUP_REGISTRY],
    topics.REPLIES.name: ["(each gateway, no group)"],
    topics.PAYMENTS.name: ["(finance consumers)"],
    topics.CONTROL.name: ["(every worker, no group)"],
    topics.DEAD_LETTER.name: ["(operators)"],
}


def build(bootstrap: str = "kafka:9092") -> AsyncAPI:
    # A broker used only as a description: one publisher per topic with its payload union.
    broker = KafkaBroker(bootstrap, description="Kafka (KRaft) in production; noida-db on a laptop")
    for topic in topics.ALL:
        payload = topic.carries[0] if len(topic.carries) == 1 else Union[topic.carries]  # type: ignore[valid-type]
        broker.publisher(
            topic.name, schema=payload, title=topic.name,
            description=f"{topic.description} Key: {topic.key}. Read by: {', '.join(GROUPS[topic.name])}.",
        )
    return AsyncAPI(broker, title="Far Mesh events", version="1.0.0",
                    description="Every Kafka topic and event of Far Mesh. JSON values; see schemas/events.py.")


def document(fmt: str = "json") -> str:
    spec = build().to_specification()
    return spec.to_yaml() if fmt == "yaml" else spec.to_json()
