"""Placement: filters say why a node was refused, groups spread or pack, the reserve holds until a node is lost."""

from __future__ import annotations

import random

from deckard.model.placement import NodeLoad, Request, Reserve, best_node, rank_nodes


def node(i: int, *, free: int = 8000, desktops: int = 0, committed: int = 0, **kw: object) -> NodeLoad:
    base = dict(
        node_id=i,
        name=f"n{i}",
        state="running",
        blocked=False,
        fresh=True,
        mem_free_mib=free,
        cpus=4.0,
        load=0.0,
        desktops=desktops,
        committed_mib=committed,
    )
    base.update(kw)
    return NodeLoad(**base)  # type: ignore[arg-type]


def test_every_excluded_node_carries_the_filter_that_excluded_it() -> None:
    nodes = [
        node(1, state="lost"),
        node(2, fresh=False),
        node(3, blocked=True),
        node(4, free=100),
        node(5, driver="vm"),
        node(6),
    ]
    ranked = rank_nodes(nodes, Request(512, driver="container"), rng=random.Random(1))
    reasons = {c.node.name: c.excluded_by for c in ranked}
    assert ranked[0].node.name == "n6" and ranked[0].score is not None
    assert reasons["n1"] == "node is lost"
    assert reasons["n2"] == "node heartbeat is stale"
    assert reasons["n3"] == "node is blocked"
    assert "not enough free memory" in (reasons["n4"] or "")
    assert "this OSF needs container" in (reasons["n5"] or "")


def test_anti_affinity_spreads_a_group_and_affinity_packs_it() -> None:
    nodes = [node(1, groups={"g": 1}), node(2, groups={"g": 0}), node(3, groups={"g": 2})]
    spread = best_node(nodes, Request(512, group="g", policy="spread"), rng=random.Random(2))
    pack = best_node(nodes, Request(512, group="g", policy="pack"), rng=random.Random(2))
    assert spread is not None and spread.name == "n2"
    assert pack is not None and pack.name == "n3"
    reasons = [c.excluded_by for c in rank_nodes(nodes, Request(512, group="g")) if c.excluded_by]
    assert all("anti-affinity" in r for r in reasons) and len(reasons) == 2


def test_reserve_keeps_room_for_the_largest_node_until_a_node_is_lost() -> None:
    nodes = [node(1, free=3000, committed=4000), node(2, free=5000, committed=1000), node(3, free=9000)]
    ranked = rank_nodes(nodes, Request(1024), reserve=Reserve("largest"), rng=random.Random(3))
    reasons = {c.node.name: c.excluded_by for c in ranked}
    assert "reserve" in (reasons["n1"] or "")  # 3000 - 1024 < 4000 / 2
    assert reasons["n3"] is None
    released = rank_nodes(nodes, Request(1024), reserve=Reserve("largest", released=True), rng=random.Random(3))
    assert all(c.excluded_by is None for c in released)


def test_a_single_node_farm_keeps_no_reserve() -> None:
    only = [node(1, free=2000, committed=6000)]
    assert best_node(only, Request(1024), reserve=Reserve("largest")) is not None


def test_the_default_placer_prefers_the_emptier_node() -> None:
    nodes = [node(1, desktops=10), node(2, desktops=0)]
    assert best_node(nodes, Request(512), rng=random.Random(4)).name == "n2"  # type: ignore[union-attr]
