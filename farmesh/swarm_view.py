"""What the swarm serves right now, read from our DHT (like the Petals health monitor).

Light enough for the gateway: a client-mode DHT peer on loopback, no model weights.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from farmesh import petals_compat


@dataclass(frozen=True)
class BlockCoverage:
    block: int
    online_peers: tuple[str, ...]
    throughput: float


class SwarmView:
    def __init__(self, initial_peers: list[str], dht_prefix: str, num_blocks: int, cache_seconds: float = 2.0) -> None:
        self.dht = petals_compat.client_dht(initial_peers)
        self.block_uids = [f"{dht_prefix}.{i}" for i in range(num_blocks)]
        self._cache_seconds = cache_seconds
        self._cached: tuple[float, list[BlockCoverage]] | None = None
        self._lock = threading.Lock()

    def coverage(self) -> list[BlockCoverage]:
        from petals.data_structures import ServerState
        from petals.utils.dht import get_remote_module_infos

        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < self._cache_seconds:
                return self._cached[1]
            infos = get_remote_module_infos(self.dht, self.block_uids, latest=True)
            result = []
            for i, info in enumerate(infos):
                online = {p: s for p, s in info.servers.items() if s.state == ServerState.ONLINE}
                result.append(BlockCoverage(i, tuple(sorted(p.to_base58() for p in online)),
                                            float(sum(s.throughput or 0.0 for s in online.values()))))
            self._cached = (time.monotonic(), result)
            return result

    def full_route(self) -> bool:
        """True when every block has at least one online server, i.e. a whole route exists."""
        return all(b.online_peers for b in self.coverage())

    def shutdown(self) -> None:
        self.dht.shutdown()


def num_blocks_of(model_dir: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir).num_hidden_layers)
