"""The provider side of signed heartbeats: what the node describes about itself (device, software, throughput)
and the publisher that signs and sends a heartbeat on schedule (signing itself: farmesh.swarm.identity).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from farmesh.swarm.identity import NodeIdentity, sign_heartbeat
from schemas import topics
from schemas.events import DeviceInfo, NodeHeartbeat

log = logging.getLogger(__name__)


def device_info(device: str) -> DeviceInfo:
    """What the node computes on: the GPU's name and memory, or the CPU's model and the machine's RAM."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        return DeviceInfo(kind="cuda", name=props.name, memory_bytes=int(props.total_memory))
    name = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    kind = "cpu" if device == "cpu" else ("mps" if device == "mps" else "other")
    return DeviceInfo(kind=kind, name=name[:200], memory_bytes=max(int(memory), 0))


def software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist in ("farmesh", "petals", "hivemind"):
        try:
            parts.append(f"{dist}/{version(dist)}")
        except PackageNotFoundError:
            pass
    return " ".join(parts)


def measure_throughput(model_dir: str, device: str, torch_dtype: str, num_blocks: int, dht_prefix: str) -> float:
    """Tokens/s this machine pushes through `num_blocks` blocks in inference (one token per step).

    Measured locally on one freshly built block (petals' own compute benchmark), never over the network:
    petals' `--throughput auto` would also run an internet speed test.
    """
    import torch

    from farmesh.swarm import petals_compat
    petals_compat.install()
    from petals import AutoDistributedConfig
    from petals.server.throughput import measure_compute_rps
    from petals.utils.convert_block import QuantType

    config = AutoDistributedConfig.from_pretrained(model_dir, dht_prefix=dht_prefix)
    dtype = getattr(torch, torch_dtype) if torch_dtype != "auto" else (torch.float16 if device == "cuda" else torch.float32)
    per_block = measure_compute_rps(config, torch.device(device), dtype, quant_type=QuantType.NONE,
                                    tensor_parallel_devices=(), n_tokens=1, n_steps=50, inference=True)
    return round(per_block / max(num_blocks, 1), 3)


@dataclass
class NodeDescription:
    """What a node announces in every heartbeat (all but state and time)."""

    wallet: str
    model: str
    start_block: int
    end_block: int
    total_blocks: int
    throughput: float
    version: str
    device: DeviceInfo
    interval_seconds: float


@dataclass
class HeartbeatPublisher:
    """Publishes a node's signed heartbeats, from the node's main thread: to Kafka (`bootstrap`), or with a `url`
    to a gateway's heartbeat ingress (POST /api/nodes/heartbeats), so the provider needs no broker access at all.

    It owns a private event loop that runs only while a heartbeat is being sent (no extra thread in a process
    that forks Petals workers). A heartbeat that cannot be delivered is logged and the next one tried on time:
    a node never stops serving because the broker is briefly away (the registry times it out meanwhile).
    """

    bootstrap: str
    identity: NodeIdentity
    description: NodeDescription
    topic: str = "farmesh.nodes.heartbeats"
    url: str | None = None  # the gateway's heartbeat ingress; set, Kafka is never contacted
    send_timeout: float = 10.0
    clock: Callable[[], float] = time.monotonic
    sent: int = 0
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop, init=False, repr=False)
    _producer: Any = field(default=None, init=False, repr=False)
    _next_at: float = field(default=0.0, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def heartbeat(self, state: str) -> NodeHeartbeat:
        d = self.description
        unsigned = NodeHeartbeat(
            peer_id=self.identity.peer_id, wallet=d.wallet, model=d.model, start_block=d.start_block,
            end_block=d.end_block, total_blocks=d.total_blocks, throughput=d.throughput, state=state,
            version=d.version, device=d.device, interval_seconds=d.interval_seconds,
        )
        return sign_heartbeat(self.identity, unsigned)

    def beat(self, state: str) -> bool:
        """Sign and send one heartbeat now; True once the broker acknowledged it."""
        with self._lock:
            self._next_at = self.clock() + self.description.interval_seconds
            event = self.heartbeat(state)
            try:
                self._loop.run_until_complete(asyncio.wait_for(self._send(event), self.send_timeout))
            except Exception as exc:  # the broker is away: keep serving, try again next time
                log.warning("heartbeat (%s) not delivered to %s: %r", state, self.destination, exc)
                self._loop.run_until_complete(self._drop_producer())
                return False
            self.sent += 1
            return True

    def tick(self, state: str) -> None:
        """Send a heartbeat if one is due."""
        if self.clock() >= self._next_at:
            self.beat(state)

    @property
    def destination(self) -> str:
        return self.url or self.bootstrap

    async def _send(self, event: NodeHeartbeat) -> None:
        if self.url:
            await self._post(event)
            return
        if self._producer is None:
            from aiokafka import AIOKafkaProducer

            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, client_id=f"farmesh-node-{event.peer_id[-8:]}",
                                        enable_idempotence=True, request_timeout_ms=int(self.send_timeout * 1000))
            await producer.start()
            self._producer = producer
        await self._producer.send_and_wait(
            self.topic, event.model_dump_json().encode("utf-8"), key=event.peer_id.encode("ascii"),
            headers=[(topics.EVENT_TYPE_HEADER, event.type.encode("ascii"))],
        )

    async def _post(self, event: NodeHeartbeat) -> None:
        import httpx

        if self._producer is None:
            self._producer = httpx.AsyncClient(timeout=self.send_timeout, trust_env=False)
        response = await self._producer.post(self.url, content=event.model_dump_json().encode("utf-8"),
                                             headers={"Content-Type": "application/json"})
        if response.status_code != 202:
            raise RuntimeError(f"ingress answered {response.status_code}: {response.text[:300]}")

    async def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.aclose() if self.url else producer.stop(), 5.0)
            except Exception:
                pass

    def close(self) -> None:
        with self._lock:
            self._loop.run_until_complete(self._drop_producer())
            self._loop.close()
