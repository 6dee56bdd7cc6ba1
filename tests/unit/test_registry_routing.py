"""The worker's route preference: which servers to avoid, and the petals 2.2 behaviour it relies on.

test_blocked_servers_leave_the_routing_table runs petals' own RemoteSequenceManager._update on a stand-in
manager (no daemon, no network): it fails if upstream stops honouring `blocked_servers` on every refresh,
which farmesh.swarm.petals_compat.set_blocked_servers depends on.
"""
from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from farmesh.swarm import petals_compat
from consumers.inference.routing import RoutePreference, servers_to_avoid

petals_compat.install()
from hivemind.dht.node import Blacklist  # noqa: E402  (what petals 2.2 uses)
from hivemind.p2p import PeerID  # noqa: E402
from petals.client.routing import sequence_manager as sm  # noqa: E402
from petals.client.routing.sequence_info import RemoteSequenceInfo  # noqa: E402
from petals.data_structures import RemoteModuleInfo, ServerInfo, ServerState  # noqa: E402

A, B, C, U = (PeerID.from_base58(p) for p in (
    "QmNPM2XhvTKXgP8gAVmMnd1hsWb8z1MGrJ2vHfkGvZdbmC", "QmRuHCbsvYmFzeV1Bx3mmXRKvZW3HLgkXfcGGSHgXm2aS1",
    "QmUt6awmSJ3LB9BG7TR2cUDntfeTnqC3sxaDZ1tS6kyLtv", "QmYF8HaJqwhAVyTQE62BRxbS1Hc47ZbGBjL8Nn3vHQm9PF"))


def test_avoid_unregistered_where_registered_nodes_cover() -> None:
    blocks = [{"a", "u"}, {"a", "u"}, {"b", "u"}, {"b", "u"}]
    assert servers_to_avoid(blocks, {"a", "b"}) == {"u"}
    # block 2 has no registered server: u is needed there, so it stays (prefer, never lose the route)
    assert servers_to_avoid([{"a", "u"}, {"a", "u"}, {"u"}, {"b", "u"}], {"a", "b"}) == set()
    # w is only needed for block 1; v serves nothing a registered node does not
    assert servers_to_avoid([{"a", "v"}, {"w", "v"}], {"a"}) == set()
    assert servers_to_avoid([{"a", "v"}, {"a", "w"}, {"w"}], {"a"}) == {"v"}
    assert servers_to_avoid([{"a"}, {"b"}], set()) == set()
    assert servers_to_avoid([], {"a"}) == set()


def _infos(servers_by_block: list[dict[PeerID, tuple[int, int]]]) -> list[RemoteModuleInfo]:
    return [RemoteModuleInfo(f"tiny.{i}", {peer: ServerInfo(state=ServerState.ONLINE, throughput=1.0,
                                                            start_block=span[0], end_block=span[1])
                                           for peer, span in servers.items()})
            for i, servers in enumerate(servers_by_block)]


class _StandIn:
    """What RemoteSequenceManager._update touches on `self`, without a DHT or daemon."""

    def __init__(self, infos: list[RemoteModuleInfo]) -> None:
        self.dht = object()
        self.config = SimpleNamespace(active_adapter=None, max_pinged=3, ping_timeout=1.0)
        self.allowed_servers = None
        self.blocked_servers = None
        self.state = SimpleNamespace(banned_peers=Blacklist(base_time=1, backoff_rate=2),
                                     sequence_info=RemoteSequenceInfo.make_empty([i.uid for i in infos]))
        self.block_uids = tuple(i.uid for i in infos)
        self.lock_changes = threading.Lock()
        self.ping_aggregator = SimpleNamespace(ping=lambda *a, **k: None)
        self.ready = threading.Event()
        self.updates = 0

    def update(self, *, wait: bool) -> None:  # what set_blocked_servers asks for
        self.updates += 1
        self.ready.clear()


def test_blocked_servers_leave_the_routing_table(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = [{A: (0, 2), U: (0, 4)}, {A: (0, 2), U: (0, 4)}, {B: (2, 4), U: (0, 4)}, {B: (2, 4), U: (0, 4)}]
    monkeypatch.setattr(sm, "get_remote_module_infos", lambda *a, **k: _infos(layout))
    manager = _StandIn(_infos(layout))

    sm.RemoteSequenceManager._update(manager)
    assert {s.peer_id for s in manager.state.sequence_info.spans_by_priority} == {A, B, U}

    petals_compat.set_blocked_servers(manager, [U.to_base58()])
    assert manager.blocked_servers == {U} and manager.updates == 1 and not manager.ready.is_set()
    sm.RemoteSequenceManager._update(manager)  # petals' own refresh applies it
    spans = manager.state.sequence_info.spans_containing_block
    assert [{s.peer_id for s in block} for block in spans] == [{A}, {A}, {B}, {B}]
    assert manager.ready.is_set()

    petals_compat.set_blocked_servers(manager, [])
    assert manager.blocked_servers is None
    sm.RemoteSequenceManager._update(manager)
    assert {s.peer_id for s in manager.state.sequence_info.spans_by_priority} == {A, B, U}


def test_route_preference_reads_the_dht_and_applies_on_change(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = [{A: (0, 2), U: (0, 4)}, {A: (0, 2), U: (0, 4)}, {B: (2, 4), U: (0, 4)}, {B: (2, 4), U: (0, 4)},
              {C: (4, 5)}]
    import petals.utils.dht

    monkeypatch.setattr(petals.utils.dht, "get_remote_module_infos", lambda *a, **k: _infos(layout))
    manager: Any = _StandIn(_infos(layout))
    preference = RoutePreference(manager)
    assert preference.apply({A.to_base58(), B.to_base58()}) == {U.to_base58()}
    assert manager.blocked_servers == {U} and manager.updates == 1
    preference.apply({A.to_base58(), B.to_base58()})
    assert manager.updates == 1  # unchanged: no refresh
    assert preference.apply({A.to_base58()}) == frozenset()  # blocks 2-3 need U now
    assert manager.blocked_servers is None and manager.updates == 2
