"""Swarm coverage and gaps from the registry's rows (pure), and the /status page's self-containment."""
from __future__ import annotations

import re

from db.views.coverage import NodeSpan, model_health, ranges, swarm_health
from producers.gateway.discovery import STATUS_CSP, STATUS_PAGE


def span(peer: str, start: int, end: int, state: str = "online", model: str = "tiny", throughput: float = 1.0,
         total: int | None = 8) -> NodeSpan:
    return NodeSpan(peer, model, start, end, total, throughput, state)


def test_full_coverage_counts_nodes_and_throughput_per_block() -> None:
    health = model_health("tiny", [span("a", 0, 4, throughput=2.0), span("b", 4, 8), span("c", 2, 6, throughput=0.5)])
    assert health.total_blocks == 8 and health.full_coverage and health.gaps == []
    assert [b.online_nodes for b in health.blocks] == [1, 1, 2, 2, 2, 2, 1, 1]
    assert [b.throughput for b in health.blocks] == [2.0, 2.0, 2.5, 2.5, 1.5, 1.5, 1.0, 1.0]
    assert health.blocks[3].peers == ("a", "c")
    assert health.min_throughput == 1.0 and health.online_peers == ("a", "b", "c")


def test_gaps_are_blocks_no_online_node_serves() -> None:
    nodes = [span("a", 0, 2), span("b", 2, 4, state="offline"), span("c", 4, 5, state="joining"),
             span("d", 6, 8, state="draining"), span("e", 7, 8)]
    health = model_health("tiny", nodes)
    assert health.gaps == [2, 3, 4, 5, 6] and health.gap_ranges == [(2, 7)] and not health.full_coverage
    assert health.nodes_by_state == {"online": 2, "offline": 1, "joining": 1, "draining": 1}
    assert health.min_throughput == 0.0


def test_model_size_comes_from_the_nodes_even_when_all_are_offline() -> None:
    health = model_health("tiny", [span("a", 0, 2, state="offline", total=4)])
    assert health.total_blocks == 4 and health.gaps == [0, 1, 2, 3] and health.online_peers == ()
    assert model_health("tiny", [span("a", 0, 2, total=None)]).total_blocks == 2
    assert model_health("tiny", [], total_blocks=3).gaps == [0, 1, 2]


def test_models_are_separate() -> None:
    models = swarm_health([span("a", 0, 8), span("b", 0, 2, model="big", total=4)])
    assert [(m.model, m.full_coverage, m.gaps) for m in models] == [("big", False, [2, 3]), ("tiny", True, [])]


def test_ranges() -> None:
    assert ranges([]) == []
    assert ranges([5, 2, 3]) == [(2, 4), (5, 6)]


def test_status_page_is_self_contained() -> None:
    # no external scripts, styles, fonts or images: everything inline, data from this origin only
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", STATUS_PAGE)
    assert "innerHTML" not in STATUS_PAGE  # provider-supplied text is only ever set as text
    assert "default-src 'none'" in STATUS_CSP and "connect-src 'self'" in STATUS_CSP
    assert "'unsafe-inline'" not in STATUS_CSP
