"""The inference worker prefers routes through nodes the registry knows as online.

The registry is the source of truth for who gets paid: a Petals server that never sent a valid heartbeat earns
nothing (its work is recorded with no wallet and flagged). So wherever registered online nodes serve a block,
the worker's client keeps every other server out of its routes; a block only unregistered servers serve stays
reachable through them (a full route beats no route). Applied through petals' blocked-servers list
(farmesh.swarm.petals_compat.set_blocked_servers), refreshed every few seconds from far_nodes and the live DHT.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from typing import Any

import asyncpg

from farmesh.swarm import petals_compat

log = logging.getLogger(__name__)


def servers_to_avoid(block_servers: Sequence[Collection[str]], preferred: Collection[str]) -> set[str]:
    """Servers to keep out of routes: those not preferred, except the ones some block cannot do without
    (a block that no preferred server serves keeps all of its servers)."""
    preferred = set(preferred)
    everyone: set[str] = set().union(*block_servers) if block_servers else set()
    needed: set[str] = set()
    for servers in block_servers:
        if preferred.isdisjoint(servers):
            needed.update(servers)
    return everyone - preferred - needed


class RoutePreference:
    """Applies the registry's online set to one Petals client (its root RemoteSequenceManager)."""

    def __init__(self, sequence_manager: Any) -> None:
        self.manager = sequence_manager
        self.avoided: frozenset[str] = frozenset()

    def block_servers(self) -> list[set[str]]:
        """Per block, the servers the DHT lists as online for it right now."""
        petals_compat.install()
        from petals.data_structures import ServerState
        from petals.utils.dht import get_remote_module_infos

        infos = get_remote_module_infos(self.manager.dht, self.manager.block_uids, latest=True)
        return [{peer.to_base58() for peer, info in block.servers.items() if info.state == ServerState.ONLINE}
                for block in infos]

    def apply(self, preferred: Collection[str]) -> frozenset[str]:
        """Avoid every unregistered server that is not needed for a full route; returns the avoided set."""
        avoided = frozenset(servers_to_avoid(self.block_servers(), preferred))
        if avoided != self.avoided:
            petals_compat.set_blocked_servers(self.manager, avoided)
            log.info("routing around %d server(s) the registry does not know as online: %s",
                     len(avoided), ", ".join(sorted(avoided)) or "-")
            self.avoided = avoided
        return avoided


async def keep_preferring_registered(pool: asyncpg.Pool, model: str, preference: RoutePreference,
                                     period: float) -> None:
    """Refresh the preference every `period` seconds until cancelled."""
    from db.views.nodes import online_peers

    while True:
        try:
            preferred = await online_peers(pool, model)
            await asyncio.to_thread(preference.apply, preferred)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("route preference refresh failed; keeping the last one", exc_info=True)
        await asyncio.sleep(period)
