"""The contract's half of the AsyncAPI document (`farmesh docs asyncapi`), from schemas/ alone.

One channel per topic, one message per event, the events' JSON schemas (as they are on the wire). Who sends and
receives what, the operations, is not written here: consumers/asyncapi.py reads it off the consumer groups'
routers, so the document follows the handlers, and composes the two. What happens outside the consumer groups
(the gateways and the nodes that produce, the people who read) is said in each channel's description.
"""
from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from schemas import topics
from schemas.events import Event

TITLE = "Far Mesh events"
VERSION = "1.0.0"
DESCRIPTION = "Every Kafka topic and event of Far Mesh. JSON values; see schemas/events.py."

# Each gateway streams its replies on a topic of its own, named in every request it publishes.
REPLY_PARAMETER = "gateway_id"

# Who reads a topic beyond what its description (schemas/topics.py) and the groups' routers already say.
READ_ELSEWHERE = {topics.DEAD_LETTER.name: "Read by operators."}

_REF = "#/components/{kind}/{name}"


def events() -> list[type[Event]]:
    """Every event class, in the order of the topics that carry them."""
    return list(dict.fromkeys(c for t in topics.ALL for c in t.carries))


def address(topic: topics.Topic) -> str:
    """The topic's name; for the replies, the pattern of one gateway's reply topic (schemas.topics.reply_topic)."""
    if topic is topics.REPLIES:
        return topics.reply_topic(f"{{{REPLY_PARAMETER}}}")
    return topic.name


def channels() -> dict[str, dict[str, Any]]:
    """One channel per topic, under the topic's name, with a message per event it carries."""
    out: dict[str, dict[str, Any]] = {}
    for topic in topics.ALL:
        channel: dict[str, Any] = {
            "address": address(topic),
            "title": topic.name,
            "description": " ".join(filter(None, [topic.description, f"Key: {topic.key}.",
                                                  READ_ELSEWHERE.get(topic.name)])),
            "messages": {c.__name__: {"$ref": _REF.format(kind="messages", name=c.__name__)} for c in topic.carries},
        }
        if topic is topics.REPLIES:
            channel["parameters"] = {REPLY_PARAMETER: {
                "description": "The gateway's id (FARMESH_GATEWAY_ID; unset, its host and port): the gateway "
                               "creates its reply topic when it starts."}}
        else:
            channel["bindings"] = {"kafka": {"topic": topic.name, "bindingVersion": "0.4.0"}}
        out[topic.name] = channel
    return out


def messages() -> dict[str, dict[str, Any]]:
    """One message per event: its JSON payload, and the header naming its type (a reader may skip it unparsed)."""
    out: dict[str, dict[str, Any]] = {}
    for event in events():
        kind = event.model_fields["type"].default
        out[event.__name__] = {
            "name": kind,
            "title": event.__name__,
            "summary": (event.__doc__ or "").strip().split("\n")[0],
            "contentType": "application/json",
            "headers": {"type": "object", "properties": {topics.EVENT_TYPE_HEADER: {"type": "string", "const": kind}}},
            "payload": {"$ref": _REF.format(kind="schemas", name=event.__name__)},
        }
    return out


def schemas() -> dict[str, dict[str, Any]]:
    """The JSON schema of every event and of what it embeds, as serialized (money as exact decimal strings)."""
    _, top = models_json_schema([(event, "serialization") for event in events()],
                                ref_template=_REF.format(kind="schemas", name="{model}"))
    return dict(top.get("$defs", {}))
