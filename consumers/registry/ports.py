"""What the registry needs from its database, and no more (cosmicpython's ports).

The handler (consumers/registry/consumer.py) locks the rows of a batch's peers, decides with the pure rules
(consumers/registry/rules.py) and saves what changed, all in one transaction; the sweep
(consumers/registry/sweeper.py) asks which live nodes went silent. The PostgreSQL adapter is
consumers/registry/repository.py (`PostgresNodes`); the unit tests use an in-memory one.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

from consumers.registry.rules import NodeRow, StateChange


class NodeRows(Protocol):
    """The registry's rows within one transaction: what is read here is locked until it ends."""

    async def lock(self, peer_ids: Iterable[str]) -> dict[str, NodeRow]:
        """The rows of these peers (those that exist), locked: no other batch decides on them meanwhile."""
        ...

    async def save(self, rows: Sequence[NodeRow], changes: Sequence[StateChange]) -> None:
        """Write the changed rows, and append their state changes (a change already recorded is skipped)."""
        ...


class NodeStore(Protocol):
    """The node registry (far_nodes, far_node_state_changes), as the registry group sees it."""

    def transaction(self) -> AbstractAsyncContextManager[NodeRows]:
        """One transaction: committed when the block ends, rolled back (nothing written) when it raises."""
        ...

    async def due_for_timeout(self, seen_before: datetime) -> Sequence[Mapping[str, Any]]:
        """Live nodes whose last accepted heartbeat entered the log before `seen_before`, in peer order:
        their peer_id, last_heartbeat_id and last_seen."""
        ...

    async def count_by_state(self) -> dict[str, int]:
        """How many nodes are in each state (states with none are absent)."""
        ...
