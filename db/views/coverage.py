"""Swarm health from the registry: per model and block, the online nodes that serve it and the gaps.

Like the Petals health monitor, but from the node table (who the mesh knows and pays), not from the DHT.
Pure functions of the rows, so they are tested without a database.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeSpan:
    peer_id: str
    model: str
    start_block: int
    end_block: int
    total_blocks: int | None
    throughput: float
    state: str


@dataclass(frozen=True)
class BlockHealth:
    block: int
    peers: tuple[str, ...]
    throughput: float

    @property
    def online_nodes(self) -> int:
        return len(self.peers)


@dataclass(frozen=True)
class ModelHealth:
    model: str
    total_blocks: int
    blocks: tuple[BlockHealth, ...]
    online_peers: tuple[str, ...]
    nodes_by_state: dict[str, int] = field(default_factory=dict)

    @property
    def gaps(self) -> list[int]:
        """Blocks that no online node serves."""
        return [b.block for b in self.blocks if not b.peers]

    @property
    def full_coverage(self) -> bool:
        return bool(self.blocks) and not self.gaps

    @property
    def gap_ranges(self) -> list[tuple[int, int]]:
        return ranges(self.gaps)

    @property
    def min_throughput(self) -> float:
        """The swarm's bottleneck: the least throughput of any block (0 with a gap)."""
        return min((b.throughput for b in self.blocks), default=0.0)


def ranges(blocks: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted block indices as [start, end) runs: [2, 3, 5] -> [(2, 4), (5, 6)]."""
    out: list[tuple[int, int]] = []
    for block in sorted(blocks):
        if out and out[-1][1] == block:
            out[-1] = (out[-1][0], block + 1)
        else:
            out.append((block, block + 1))
    return out


def model_health(model: str, nodes: Iterable[NodeSpan], total_blocks: int | None = None) -> ModelHealth:
    """Coverage of one model's blocks by its online nodes.

    The model's size is `total_blocks` if given, else the largest any node announced (offline ones too,
    so a model whose nodes all went away still shows all of its blocks as gaps).
    """
    nodes = [n for n in nodes if n.model == model]
    size = total_blocks or max((n.total_blocks or n.end_block for n in nodes), default=0)
    online = [n for n in nodes if n.state == "online"]
    blocks = tuple(
        BlockHealth(
            block=i,
            peers=tuple(sorted(n.peer_id for n in online if n.start_block <= i < n.end_block)),
            throughput=float(sum(n.throughput for n in online if n.start_block <= i < n.end_block)),
        )
        for i in range(size)
    )
    by_state: dict[str, int] = defaultdict(int)
    for n in nodes:
        by_state[n.state] += 1
    return ModelHealth(model, size, blocks, tuple(sorted(n.peer_id for n in online)), dict(by_state))


def swarm_health(nodes: Iterable[NodeSpan]) -> list[ModelHealth]:
    """Every model the registry knows, by name."""
    nodes = list(nodes)
    return [model_health(model, nodes) for model in sorted({n.model for n in nodes})]
