"""schemas/ is the single source of truth: every event is documented, enveloped and round-trips as JSON."""
from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

from farmesh.cli import cli
from schemas import events, topics

EVENT_TYPES = {c for t in topics.ALL for c in t.carries}


def test_every_event_class_travels_on_a_topic():
    defined = {c for c in vars(events).values()
               if isinstance(c, type) and issubclass(c, events.Event) and "type" in c.model_fields}
    assert defined == EVENT_TYPES


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES, key=lambda c: c.__name__))
def test_envelope(event_type):
    fields = event_type.model_fields
    assert {"event_id", "type", "schema_version", "occurred_at", "source"} <= set(fields)
    assert fields["type"].default.count(".") >= 1 or fields["type"].default == "deadletter"


def test_money_is_an_exact_string_on_the_wire_and_back():
    e = events.InferenceRequested(request_id="r", model="m", prompt="p", max_tokens=1,
                                  price_per_token=Decimal("0.000000000000000001"), reply_topic="t",
                                  account_id=uuid.uuid4(), platform_fee_rate=Decimal("0.05"))
    wire = json.loads(e.model_dump_json())
    assert wire["price_per_token"] == "0.000000000000000001"
    assert wire["platform_fee_rate"] == "0.05" and wire["schema_version"] == 3
    assert events.InferenceRequested.model_validate_json(e.model_dump_json()) == e


def test_unknown_fields_and_bad_ids_are_rejected():
    with pytest.raises(ValidationError):
        events.InferenceRequested(request_id="has space", model="m", prompt="p", max_tokens=1,
                                  price_per_token=Decimal(1), reply_topic="t", account_id=uuid.uuid4())
    with pytest.raises(ValidationError):
        events.session_event_adapter.validate_json(b'{"type": "inference.completed", "extra": 1}')


def test_asyncapi_document_covers_every_topic_and_event():
    result = CliRunner().invoke(cli, ["docs", "asyncapi"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["asyncapi"].startswith("3.")
    assert set(doc["channels"]) == {t.name for t in topics.ALL}
    assert {c.__name__ for c in EVENT_TYPES} <= set(doc["components"]["schemas"])
    # Built from the groups' routers: each group's subscriber receives, on its topic's channel.
    received = {op["title"]: op["channel"]["$ref"] for op in doc["operations"].values() if op["action"] == "receive"}
    assert received == {"inference": "#/channels/farmesh.inference.requests",
                        "worker-control": "#/channels/farmesh.inference.control",
                        "ledger": "#/channels/farmesh.sessions", "payments": "#/channels/farmesh.sessions",
                        "registry": "#/channels/farmesh.nodes.heartbeats"}
    sent = {(op["tags"][0]["name"], op["channel"]["$ref"]) for op in doc["operations"].values() if op["action"] == "send"}
    assert {("inference", "#/channels/farmesh.sessions"), ("inference", "#/channels/farmesh.inference.replies"),
            ("registry", "#/channels/farmesh.nodes.heartbeats")} <= sent
    assert doc["channels"][topics.REPLIES.name]["address"] == topics.reply_topic("{gateway_id}")

    def refs(node):
        if isinstance(node, dict):
            yield from ([node["$ref"]] if isinstance(node.get("$ref"), str) else [])
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in set(refs(doc)):  # every reference resolves
        target = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
    assert yaml.safe_load(CliRunner().invoke(cli, ["docs", "asyncapi", "--format", "yaml"]).output) == doc
