"""Dead letters are counted in the registry the service serves on /metrics."""
from __future__ import annotations

from faststream.kafka import TestKafkaBroker
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from farmesh.kafka import messaging
from schemas import topics


class Ping(BaseModel):
    n: int


async def test_invalid_message_is_dead_lettered_and_counted_in_the_service_registry():
    registry = CollectorRegistry()
    broker = messaging.create_broker("127.0.0.1:1", "svc", registry)
    handled, parked = [], []

    @broker.subscriber("in", group_id="svc")
    async def handle(ping: Ping) -> None:
        handled.append(ping)

    @broker.subscriber(topics.DEAD_LETTER.name, group_id="t")
    async def dead(body: dict) -> None:
        parked.append(body)

    async with TestKafkaBroker(broker) as br:
        await br.publish({"n": 1}, "in")
        await br.publish({"n": "x"}, "in", key=b"k")
    assert [p.n for p in handled] == [1]
    assert len(parked) == 1 and parked[0]["key"] == "k" and parked[0]["consumer_group"] == "svc"
    assert registry.get_sample_value("farmesh_dead_letters_total", {"consumer_group": "svc", "topic": "in"}) == 1
    # a second service in the same process has its own count
    assert messaging.create_broker("127.0.0.1:1", "other", CollectorRegistry()) is not broker


def test_a_cluster_bootstrap_reaches_faststream_as_a_list_of_servers():
    # FastStream takes a single string for ONE server: "a:1,b:2" would be dialled as host "a:1,b" port 2.
    assert messaging.bootstrap_servers("127.0.0.1:9092") == ["127.0.0.1:9092"]
    assert messaging.bootstrap_servers("127.0.0.1:1, 127.0.0.1:2,127.0.0.1:3,") == [
        "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
