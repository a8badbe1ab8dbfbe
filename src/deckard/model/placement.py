"""Choosing a node for a desktop: pluggable placers fed with live figures from heartbeats, and why not elsewhere.

QVD's load balancer ranks hosts by static bogomips and MemTotal; Deckard ranks them by what each node reported in
its last heartbeat.  A placement is two steps, kept apart so each can be explained:

1. **Filters** (fixed order, the first that fails is the reason kept): node not running, heartbeat stale, blocked,
   wrong driver for the OSF, not enough free memory, the memory kept in **reserve** for the desktops of a failed
   node (seed 003: "host outage tolerance"), then the desktop's **placement group** (anti-affinity spreads the
   group over nodes, affinity packs it onto the node that already has most of it).
2. **Placer** (registered by name, like drivers): scores the nodes that passed; the highest wins.  The default,
   ``qvd``, is QVD's ``(w_ram * free_ram + w_cpu * free_cpu) / (desktops + 1) + random(0, w_random)``.  Every
   placer is a base score plus a uniform noise, so :class:`NodeIndex` can find the winner among 1,000 nodes
   without scoring them all, drawing it with the same odds as the exhaustive :func:`rank_nodes` / :func:`best_node`.

Everything here is pure: the same figures and the same random source give the same answer, so tests and the
``explain`` command show exactly what a start would do.
"""

from __future__ import annotations

import functools
import math
import random
from bisect import bisect_left, insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

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


@dataclass(frozen=True)
class Placer:
    """A placer scores a node ``base(node) + uniform(0, noise)``: the base ranks, the noise breaks ties at random.

    Keeping the two apart is what lets :class:`NodeIndex` find the winner without scoring every node.
    """

    base: Callable[[NodeLoad, Weights], float]
    noise: Callable[[Weights], float]


@functools.lru_cache(maxsize=64)
def serves(node_driver: str, osf_driver: str) -> bool:
    """Whether a node registered with ``node_driver`` (one name or several: ``container,vm``) runs desktops of
    an OSF with ``osf_driver``; a fake node simulates any OSF."""
    return node_driver == "fake" or osf_driver in node_driver.split(",")


def _base_qvd(n: NodeLoad, w: Weights) -> float:
    free_cpu = n.cpus - n.load
    return (w.ram * n.mem_free_mib + w.cpu * (free_cpu if free_cpu > 0 else 0.0)) / (n.desktops + 1)


PLACERS: dict[str, Placer] = {
    "qvd": Placer(_base_qvd, lambda w: w.random),
    "fewest": Placer(lambda n, _w: float(-n.desktops), lambda _w: 0.5),
    "binpack": Placer(lambda n, _w: -float(n.mem_free_mib), lambda _w: 1.0),  # fill the fullest node: frees nodes
}
"""Placers by name (config key ``placement.placer``); add one by registering a base and a noise width here."""


def get_placer(name: str) -> Placer:
    return pick(PLACERS, name, "placer", "unknown_placer")


def _usable(n: NodeLoad) -> bool:
    return n.state == NodeState.RUNNING and n.fresh and not n.blocked


def _share(reserve: Reserve, usable: int, largest_committed: int, largest_total: int) -> int:
    if reserve.released or reserve.mode == "none" or usable < 2:
        return 0  # a farm of one node has nowhere to fail over to
    if reserve.mode == "fraction":
        return int(max(reserve.fraction, 0.0) * largest_total)
    return -(-largest_committed // (usable - 1))  # spread over the survivors, rounded up


def reserve_share_mib(nodes: Sequence[NodeLoad], reserve: Reserve) -> int:
    """Memory each usable node keeps free so the others can take the desktops of the one that fails."""
    if reserve.released or reserve.mode == "none":
        return 0
    usable = [n for n in nodes if _usable(n)]
    if len(usable) < 2:
        return 0
    committed = max(n.committed_mib for n in usable)
    return _share(reserve, len(usable), committed, max(n.mem_free_mib + n.committed_mib for n in usable))


def _filter(n: NodeLoad, req: Request, share: int) -> str | None:
    if n.state != NodeState.RUNNING:
        return f"node is {n.state}"
    if not n.fresh:
        return "node heartbeat is stale"
    if n.blocked:
        return "node is blocked"
    if req.driver is not None and not serves(n.driver, req.driver):
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
    p = get_placer(placer)
    noise = p.noise(weights)
    share = reserve_share_mib(nodes, reserve)
    cands: list[Candidate] = []
    for n in nodes:
        reason = _filter(n, req, share)
        cands.append(
            Candidate(n, None, reason) if reason else Candidate(n, p.base(n, weights) + rng.uniform(0, noise), None)
        )
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
        if req.driver is not None and n.driver != req.driver and not serves(n.driver, req.driver):
            continue
        free_cpu = n.cpus - n.load
        score = (w_ram * n.mem_free_mib + w_cpu * (free_cpu if free_cpu > 0 else 0.0)) / (n.desktops + 1)
        score += w_rnd * rnd()
        if score > best_score:
            best, best_score = n, score
    return best


_Key = tuple[float, int, str]  # (-base, free memory, driver): the nodes of one key win and lose together


class NodeIndex:
    """The usable nodes grouped by what decides a placement, ordered by base score: the winner without scoring all.

    :func:`best_node` draws a noise for each of N nodes; the winner can only be a node whose base is within the
    noise width of the best eligible base, and nodes with equal figures (most of a farm filled evenly) are
    interchangeable.  So the index keeps one entry per distinct ``(base, free memory, driver)`` — every member
    passes or fails each filter alike — in base order, and a decision walks the entries from the top until no
    lower one can win.  For an entry of ``m`` nodes it draws the largest of their ``m`` noises at once
    (``u ** (1/m)``, which has the law of the maximum of ``m`` uniforms) and, if the entry wins, one of its
    members uniformly.  The chosen node therefore has exactly the odds of the exhaustive scorer's choice
    (:func:`rank_nodes`, :func:`best_node`); with no noise (a zero width) it is the same node.  Placement groups
    need every node's group count: those requests are ranked exhaustively.  ``place`` and ``update`` keep the
    index current between decisions.
    """

    def __init__(
        self,
        nodes: Sequence[NodeLoad],
        weights: Weights = Weights(),
        *,
        reserve: Reserve = Reserve(mode="none"),
        placer: str = "qvd",
    ) -> None:
        self._placer, self._placer_name = get_placer(placer), placer
        self._weights, self._reserve = weights, reserve
        self._noise = self._placer.noise(weights)
        self._nodes = list(nodes)
        self._position = {n.node_id: i for i, n in enumerate(self._nodes)}
        self._members: dict[_Key, list[int]] = {}
        self._order: list[_Key] = []  # ascending -base: best first
        self._key: dict[int, _Key] = {}
        usable = [n for n in self._nodes if _usable(n)]
        self._share = reserve_share_mib(usable, reserve)
        self._largest_committed = max((n.committed_mib for n in usable), default=0)
        for i, n in enumerate(self._nodes):
            self._add(i, n)

    @property
    def nodes(self) -> list[NodeLoad]:
        return list(self._nodes)

    def _add(self, i: int, n: NodeLoad) -> None:
        if not _usable(n):
            return
        key = (-self._placer.base(n, self._weights), n.mem_free_mib, n.driver)
        members = self._members.get(key)
        if members is None:
            self._members[key] = [i]
            insort(self._order, key)
        else:
            members.append(i)
        self._key[i] = key

    def _remove(self, i: int) -> None:
        key = self._key.pop(i, None)
        if key is None:
            return
        members = self._members[key]
        members.remove(i)
        if not members:
            del self._members[key]
            del self._order[bisect_left(self._order, key)]

    def update(self, node: NodeLoad) -> None:
        """New figures for a node (a heartbeat, a change of state, a new node): the reserve is worked out again."""
        self._set(node)
        usable = [n for n in self._nodes if _usable(n)]
        self._share = reserve_share_mib(usable, self._reserve)
        self._largest_committed = max((n.committed_mib for n in usable), default=0)

    def place(self, node: NodeLoad, memory_mib: int) -> NodeLoad:
        """Count a desktop of ``memory_mib`` on ``node``, as the next heartbeat would report it."""
        n = self._nodes[self._position[node.node_id]]
        committed = n.committed_mib + memory_mib
        placed = replace(n, desktops=n.desktops + 1, mem_free_mib=n.mem_free_mib - memory_mib, committed_mib=committed)
        self._set(placed)
        if self._reserve.mode == "largest" and _usable(placed) and committed > self._largest_committed:
            self._largest_committed = committed  # free + committed is unchanged: only the largest node can grow
            self._share = _share(self._reserve, len(self._key), committed, 0)
        return placed

    def _set(self, node: NodeLoad) -> None:
        i = self._position.setdefault(node.node_id, len(self._nodes))
        if i == len(self._nodes):  # a node that registered since the index was built
            self._nodes.append(node)
        self._remove(i)
        self._nodes[i] = node
        self._add(i, node)

    def best(self, req: Request, rng: random.Random) -> NodeLoad | None:
        """The node a start goes to, drawn as :func:`best_node` draws it (see the class docstring)."""
        if req.group is not None:
            ranked = rank_nodes(self._nodes, req, self._weights, rng, reserve=self._reserve, placer=self._placer_name)
            return ranked[0].node if ranked and ranked[0].score is not None else None
        need, driver, width = req.memory_mib + self._share, req.driver, self._noise
        rnd = rng.random
        best, winners = -math.inf, None
        for key in self._order:
            base = -key[0]
            if width > 0 and base + width <= best:
                break  # no lower entry can beat it, even with the largest noise
            if key[1] < need or (driver is not None and key[2] != driver and not serves(key[2], driver)):
                continue
            if width <= 0:  # no noise: the first node (in the caller's order) of the best base, as rank_nodes
                if base > best:
                    best, winners = base, list(self._members[key])
                elif winners is not None and base == best:
                    winners.extend(self._members[key])
                else:
                    break
                continue
            members = self._members[key]
            u = rnd()
            score = base + width * (u if len(members) == 1 else u ** (1.0 / len(members)))
            if score > best:
                best, winners = score, members
        if winners is None:
            return None
        if width <= 0:
            return self._nodes[min(winners)]
        return self._nodes[winners[rng.randrange(len(winners))] if len(winners) > 1 else winners[0]]

    def explain(self, req: Request, rng: random.Random | None = None) -> list[Candidate]:
        """Every node with its score or the filter that excluded it: :func:`rank_nodes` on the current figures."""
        return rank_nodes(self._nodes, req, self._weights, rng, reserve=self._reserve, placer=self._placer_name)
