"""`farmesh docs`: the AsyncAPI document of the mesh, built from the consumer groups' real routers.

FastStream generates the operations from the routers the groups declare (consumers/<group>/consumer.py): each
subscriber a `receive`, each declared publisher a `send`, with their titles and descriptions. The channels, the
messages and their schemas are the contract's (schemas/asyncapi.py). FastStream names a channel after the
endpoint, so left alone it would give one topic several channels (a subscriber's and each publisher's), none to a
topic no group declares, and a batch handler's payload (raw records) would name no event. So each generated
operation is pointed at its topic's one channel, with the events it sends (a publisher's declared schema), or
every event the topic carries. Operations are tagged with their consumer group; a subscriber's names its
Kafka consumer group id.

This module composes the four groups on purpose (tests/unit/test_layout.py lets it); nothing imports it but the
root command's table (farmesh/cli.py), by name.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote

import click
from faststream.kafka import KafkaBroker, KafkaRouter
from faststream.specification import AsyncAPI

from consumers.inference.consumer import router as inference
from consumers.ledger.consumer import router as ledger
from consumers.payments.consumer import router as payments
from consumers.registry.consumer import router as registry
from schemas import asyncapi as contract
from schemas import topics

# Each group's router as the group declares it (its module's `router`).
ROUTERS: dict[str, KafkaRouter] = {
    topics.GROUP_INFERENCE: inference,
    topics.GROUP_LEDGER: ledger,
    topics.GROUP_PAYMENTS: payments,
    topics.GROUP_REGISTRY: registry,
}


def _ref(*parts: str) -> dict[str, str]:
    """A JSON-pointer reference into the document (RFC 6901, percent-encoded like FastStream's)."""
    return {"$ref": "#/" + "/".join(quote(p.replace("~", "~0").replace("/", "~1"), safe="~:._-") for p in parts)}


def _target(reference: dict[str, str]) -> list[str]:
    """The path a reference points to: the inverse of `_ref`."""
    return [unquote(p).replace("~1", "/").replace("~0", "~") for p in reference["$ref"].removeprefix("#/").split("/")]


def _refs(node: Any) -> Iterator[list[str]]:
    """Every reference under `node`, depth first."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield _target(node)
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _events_named(generated: dict[str, Any], operation: dict[str, Any], carried: list[str]) -> list[str]:
    """The events of `carried` an operation's generated payloads name (following FastStream's own schemas)."""
    schemas, messages = generated["components"]["schemas"], generated["components"]["messages"]
    found: list[str] = []
    seen: set[str] = set()
    pending = [generated["channels"][p[1]]["messages"][p[3]] for p in _refs(operation["messages"])]
    while pending:
        for path in _refs(pending.pop()):
            kind, name = path[-2], path[-1]
            if name in carried and name not in found:
                found.append(name)
            elif kind in ("messages", "schemas") and (kind, name) not in seen:
                seen.add((kind, name))
                pending.append((messages if kind == "messages" else schemas).get(name, {}))
    return [name for name in carried if name in found]


def _operations(generated: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The generated operations, each on its topic's channel, tagged with its group."""
    by_name = {t.name: t for t in topics.ALL}
    group_of: dict[str, str] = {}
    group_id_of: dict[str, str | None] = {}
    for group, router in ROUTERS.items():
        for sub in router.subscribers:
            group_of[sub.specification.name] = group
            group_id_of[sub.specification.name] = sub.group_id
        for pub in router.publishers:
            group_of[pub.specification.name] = group
    out: dict[str, dict[str, Any]] = {}
    # FastStream keeps a router's publishers in a WeakSet: their order follows memory addresses. Sorted by group,
    # then receive before send, then title, the document is the same byte for byte on every run.
    ordered = sorted(generated["operations"].items(),
                     key=lambda item: (group_of.get(item[0], "~"), item[1]["action"] != "receive", item[0]))
    for key, generated_op in ordered:
        channel = generated["channels"][_target(generated_op["channel"])[1]]
        topic = by_name[channel["address"]]
        carried = [c.__name__ for c in topic.carries]
        named = _events_named(generated, generated_op, carried) or carried
        operation: dict[str, Any] = {
            "action": generated_op["action"],
            "channel": _ref("channels", topic.name),
            "title": key,
            "description": channel.get("description") or "",
            "messages": [_ref("channels", topic.name, "messages", name) for name in named],
        }
        if key in group_of:
            operation["tags"] = [{"name": group_of[key], "description": f"consumer group `{group_of[key]}`"}]
        if group_id_of.get(key):
            operation["bindings"] = {"kafka": {"groupId": {"type": "string", "enum": [group_id_of[key]]},
                                               "bindingVersion": "0.4.0"}}
        out[key] = operation
    return out


def build(bootstrap: str = "kafka:9092") -> dict[str, Any]:
    """The AsyncAPI 3 document (a JSON-able dict) of every topic and event, and of what each group does with them.

    The groups' routers are included into a broker made for the description; a router has one broker, so this is
    for a process of its own (`farmesh docs`), not one that serves a group.
    """
    broker = KafkaBroker(bootstrap, description="Kafka (KRaft) in production; noida-db on a laptop")
    for router in ROUTERS.values():
        broker.include_router(router)
    generated = AsyncAPI(broker, title=contract.TITLE, version=contract.VERSION, description=contract.DESCRIPTION,
                         schema_version="3.0.0").to_specification().to_jsonable()
    servers = [_ref("servers", name) for name in generated.get("servers", {})]
    channels = {name: {**channel, "servers": servers} for name, channel in contract.channels().items()}
    return {
        "asyncapi": generated["asyncapi"],
        "info": generated["info"],
        "defaultContentType": generated.get("defaultContentType", "application/json"),
        "servers": generated.get("servers", {}),
        "channels": channels,
        "operations": _operations(generated),
        "components": {"messages": contract.messages(), "schemas": contract.schemas()},
    }


def document(fmt: str = "json") -> str:
    doc = build()
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    return json.dumps(doc, indent=2, ensure_ascii=False)


@click.group()
def docs() -> None:
    """Generated documentation."""


@docs.command("asyncapi")
@click.option("--format", "fmt", type=click.Choice(["json", "yaml"]), default="json", show_default=True)
def asyncapi(fmt: str) -> None:
    """Print the AsyncAPI document of every topic and event (generated from the consumer groups' routers)."""
    click.echo(document(fmt))
