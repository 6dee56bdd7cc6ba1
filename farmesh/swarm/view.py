"""What the swarm serves right now, read from our DHT (like the Petals health monitor).

Light enough for the gateway: a client-mode DHT peer, no model weights.  A killed server stays
listed ONLINE in the DHT until its record expires, so servers are also pinged: only servers that
answer count.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

from farmesh.swarm import petals_compat
@dataclass(frozen=True)
class BlockCoverage:
    block: int
    online_peers: tuple[str, ...]
    throughput: float


def live_coverage(dht: Any, block_uids: Sequence[str], timeout: float = 5.0) -> list[BlockCoverage]:
    """Per block: the ONLINE servers that answer a ping (answers within about 2 x timeout)."""
    petals_compat.install()
    from petals.data_structures import ServerState
    from petals.utils.dht import compute_spans, get_remote_module_infos
    from petals.utils.ping import ping_parallel

    infos = get_remote_module_infos(dht, list(block_uids), latest=True, return_future=True).result(timeout)
    spans = compute_spans(infos, min_state=ServerState.ONLINE)
    # Pings get half the time, so one dead peer times out its own ping, not the whole check.
    rtts = dht.run_coroutine(partial(ping_parallel, list(spans), wait_timeout=timeout / 2), return_future=True).result(timeout)
    live = {peer: span for peer, span in spans.items() if math.isfinite(rtts.get(peer, math.inf))}
    return [
        BlockCoverage(
            block=i,
            online_peers=tuple(sorted(p.to_base58() for p, s in live.items() if s.start <= i < s.end)),
            throughput=float(sum(s.server_info.throughput or 0.0 for s in live.values() if s.start <= i < s.end)),
        )
        for i in range(len(block_uids))
    ]


class SwarmView:
    def __init__(self, initial_peers: list[str], dht_prefix: str, num_blocks: int, cache_seconds: float = 2.0) -> None:
        if not initial_peers:
            raise ValueError("initial_peers must name our own DHT bootstrap peers")
        petals_compat.install()
        import hivemind

        self.dht = hivemind.DHT(initial_peers=initial_peers, client_mode=True, start=True)
        self.block_uids = [f"{dht_prefix}.{i}" for i in range(num_blocks)]
        self._cache_seconds = cache_seconds
        self._cached: tuple[float, list[BlockCoverage]] | None = None
        self._lock = threading.Lock()

    def coverage(self) -> list[BlockCoverage]:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self._cache_seconds:
                self._cached = (time.monotonic(), live_coverage(self.dht, self.block_uids))
            return self._cached[1]

    def full_route(self) -> bool:
        """True when every block has a live online server, i.e. a whole route through the swarm exists."""
        try:
            return all(b.online_peers for b in self.coverage())
        except Exception:
            return False

    def shutdown(self) -> None:
        self.dht.shutdown()


def num_blocks_of(model_dir: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir).num_hidden_layers)
