"""Choosing a node for a desktop: QVD's default load balancer, fed with live figures from heartbeats.

score = (w_ram * free_ram_mib + w_cpu * free_cpu) / (desktops + 1) + random(0, w_random); highest wins.
Nodes that are blocked, not running or without room for the OSF's memory are filtered out, and the reason
is kept so a refused start can say why.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeLoad:
    node_id: int
    name: str
    state: str
    blocked: bool
    fresh: bool  # heartbeat recent enough
    mem_free_mib: int
    cpus: float
    load: float
    desktops: int


@dataclass(frozen=True)
class Weights:
    ram: float = 1.0
    cpu: float = 1000.0
    random: float = 100.0


@dataclass(frozen=True)
class Candidate:
    node: NodeLoad
    score: float | None
    excluded_by: str | None


def rank_nodes(
    nodes: list[NodeLoad], memory_mib: int, weights: Weights = Weights(), rng: random.Random | None = None
) -> list[Candidate]:
    """Every node with its score (best first) or the filter that excluded it (after the candidates)."""
    rng = rng or random.Random()
    out: list[Candidate] = []
    for n in nodes:
        reason = None
        if n.state != "running":
            reason = f"node is {n.state}"
        elif not n.fresh:
            reason = "node heartbeat is stale"
        elif n.blocked:
            reason = "node is blocked"
        elif n.mem_free_mib < memory_mib:
            reason = f"not enough free memory ({n.mem_free_mib} MiB free, {memory_mib} MiB needed)"
        if reason:
            out.append(Candidate(n, None, reason))
            continue
        free_cpu = max(n.cpus - n.load, 0.0)
        score = (weights.ram * n.mem_free_mib + weights.cpu * free_cpu) / (n.desktops + 1)
        out.append(Candidate(n, score + rng.uniform(0, weights.random), None))
    return sorted(out, key=lambda c: (c.score is None, -(c.score or 0.0)))
