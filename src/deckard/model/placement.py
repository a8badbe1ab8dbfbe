"""Choosing a node for a desktop: pluggable placers fed with live figures from heartbeats, and why not elsewhere.

QVD's load balancer ranks hosts by static bogomips and MemTotal; Deckard ranks them by what each node reported in
its last heartbeat.  A placement is two steps, kept apart so each can be explained:

1. **Filters** (fixed order, the first that fails is the reason kept): node not running, heartbeat stale, blocked,
   wrong driver for the OSF, not enough free memory, the memory kept in **reserve** for the desktops of a failed
   node (seed 003: "host outage tolerance"), then the desktop's **placement group** (anti-affinity spreads the
   group over nodes, affinity packs it onto the node that already has most of it).
2. **Placer** (registered by name, like drivers): scores the nodes that passed; the highest wins.  The default,
   ``qvd``, is QVD's ``(w_ram * free_ram + w_cpu * free_cpu) / (desktops + 1) + random(0, w_random)``.

Everything here is pure: the same figures and the same random source give the same answer, so tests and the
``explain`` command show exactly what a start would do.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from deckard.model.errors import pick
from deckard.model.states import NodeState

SPREAD = "spread"  # anti-affinity: a group's desktops on as many nodes as possible
PACK = "pack"  # affinity: a group's desktops together
POLICIES = (SPREAD, PACK)


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
    driver: str = "container"
    committed_mib: int = 0  # memory of the OSFs of the desktops assigned to the node
    groups: dict[str, int] = field(default_factory=dict)  # placement group → desktops of it on the node


@dataclass(frozen=True)
class Weights:
    ram: float = 1.0
    cpu: float = 1000.0
    random: float = 100.0


@dataclass(frozen=True)
class Request:
    """What the desktop needs: memory, the driver its OSF runs on, its placement group."""

    memory_mib: int
    driver: str | None = None
    group: str | None = None
    policy: str | None = None  # spread | pack (None: spread when a group is named)


@dataclass(frozen=True)
class Reserve:
    """Memory kept free for the desktops of a node that fails: ``largest`` node's, a ``fraction``, or none.

    ``released`` (a node is lost right now) lets the reserve be used: that is what it is kept for.
    """

    mode: str = "largest"  # largest | fraction | none
    fraction: float = 0.0
    released: bool = False


@dataclass(frozen=True)
class Candidate:
    node: NodeLoad
    score: float | None
    excluded_by: str | None


Scorer = Callable[[NodeLoad, Request, Weights, random.Random], float]


def _score_qvd(n: NodeLoad, _req: Request, w: Weights, rng: random.Random) -> float:
    free_cpu = max(n.cpus - n.load, 0.0)
    return (w.ram * n.mem_free_mib + w.cpu * free_cpu) / (n.desktops + 1) + rng.uniform(0, w.random)


def _score_fewest(n: NodeLoad, _req: Request, _w: Weights, rng: random.Random) -> float:
    return -n.desktops + rng.uniform(0, 0.5)


def _score_binpack(n: NodeLoad, _req: Request, _w: Weights, rng: random.Random) -> float:
    return -float(n.mem_free_mib) + rng.uniform(0, 1)  # fill the fullest node first: frees whole nodes


PLACERS: dict[str, Scorer] = {"qvd": _score_qvd, "fewest": _score_fewest, "binpack": _score_binpack}
"""Placers by name (config key ``placement.placer``); add one by registering a scorer here."""


def get_placer(name: str) -> Scorer:
    return pick(PLACERS, name, "placer", "unknown_placer")


def reserve_share_mib(nodes: Sequence[NodeLoad], reserve: Reserve) -> int:
    """Memory each usable node keeps free so the others can take the desktops of the one that fails."""
    usable = [n for n in nodes if n.state == NodeState.RUNNING and n.fresh and not n.blocked]
    if reserve.released or reserve.mode == "none" or len(usable) < 2:
        return 0  # a farm of one node has nowhere to fail over to
    if reserve.mode == "fraction":
        return int(max(reserve.fraction, 0.0) * max(n.mem_free_mib + n.committed_mib for n in usable))
    largest = max(n.committed_mib for n in usable)
    return -(-largest // (len(usable) - 1))  # spread over the survivors, rounded up


def _filter(n: NodeLoad, req: Request, share: int) -> str | None:
    if n.state != NodeState.RUNNING:
        return f"node is {n.state}"
    if not n.fresh:
        return "node heartbeat is stale"
    if n.blocked:
        return "node is blocked"
    if req.driver is not None and n.driver not in (req.driver, "fake"):  # a fake node simulates any OSF
        return f"node runs {n.driver} desktops; this OSF needs {req.driver}"
    if n.mem_free_mib < req.memory_mib:
        return f"not enough free memory ({n.mem_free_mib} MiB free, {req.memory_mib} MiB needed)"
    if share and n.mem_free_mib - req.memory_mib < share:
        return f"would use the {share} MiB kept in reserve for the desktops of a failed node"
    return None


def _group_filter(cands: list[Candidate], req: Request) -> list[Candidate]:
    if req.group is None:
        return cands
    ok = [c for c in cands if c.score is not None]
    if not ok:
        return cands
    counts = {c.node.node_id: c.node.groups.get(req.group, 0) for c in ok}
    if (req.policy or SPREAD) == SPREAD:
        want = min(counts.values())
        why = "anti-affinity: {n} desktop(s) of group {g!r} already here, other nodes have fewer"
    else:
        want = max(counts.values())
        why = "affinity: group {g!r} is packed on another node ({n} here)"
    out = []
    for c in cands:
        n = counts.get(c.node.node_id)
        if n is not None and n != want:
            c = Candidate(c.node, None, why.format(n=n, g=req.group))
        out.append(c)
    return out


def rank_nodes(
    nodes: Sequence[NodeLoad],
    memory_mib: int | Request,
    weights: Weights = Weights(),
    rng: random.Random | None = None,
    *,
    reserve: Reserve = Reserve(mode="none"),
    placer: str = "qvd",
) -> list[Candidate]:
    """Every node with its score (best first) or the filter that excluded it (after the candidates)."""
    req = memory_mib if isinstance(memory_mib, Request) else Request(memory_mib)
    rng = rng or random.Random()
    score = get_placer(placer)
    share = reserve_share_mib(nodes, reserve)
    cands: list[Candidate] = []
    for n in nodes:
        reason = _filter(n, req, share)
        cands.append(Candidate(n, None, reason) if reason else Candidate(n, score(n, req, weights, rng), None))
    cands = _group_filter(cands, req)
    return sorted(cands, key=lambda c: (c.score is None, -(c.score or 0.0)))


def best_node(
    nodes: Sequence[NodeLoad],
    req: Request,
    weights: Weights = Weights(),
    rng: random.Random | None = None,
    *,
    reserve: Reserve = Reserve(mode="none"),
    placer: str = "qvd",
) -> NodeLoad | None:
    """The winner of :func:`rank_nodes` without building the explanation (the hot path of a start)."""
    if req.group is not None or placer != "qvd":
        ranked = rank_nodes(nodes, req, weights, rng, reserve=reserve, placer=placer)
        return ranked[0].node if ranked and ranked[0].score is not None else None
    rnd = (rng or random.Random()).random
    need = req.memory_mib + reserve_share_mib(nodes, reserve)
    w_ram, w_cpu, w_rnd = weights.ram, weights.cpu, weights.random
    best, best_score = None, -1.0
    for n in nodes:  # the same filters as _filter, inlined: this loop is the placement rate
        if n.state != NodeState.RUNNING or not n.fresh or n.blocked or n.mem_free_mib < need:
            continue
        if req.driver is not None and n.driver != req.driver and n.driver != "fake":
            continue
        free_cpu = n.cpus - n.load
        score = (w_ram * n.mem_free_mib + w_cpu * (free_cpu if free_cpu > 0 else 0.0)) / (n.desktops + 1)
        score += w_rnd * rnd()
        if score > best_score:
            best, best_score = n, score
    return best
