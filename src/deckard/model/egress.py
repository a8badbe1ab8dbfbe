"""Egress policy: where a desktop may open connections, as ordered allow/deny rules, and why a packet is decided.

A policy is text, one rule per line or separated by ``;``::

    deny tcp any port 25           # no mail servers
    allow tcp 10.20.0.0/16 port 443,8443
    deny 10.0.0.0/8
    allow any                      # (the default when no rule matches)

Grammar: ``allow|deny [tcp|udp|icmp] (any|ADDRESS|ADDRESS/PREFIX) [port N|N-M[,...]]``; ports only with tcp or
udp; ``#`` starts a comment.  The first rule that matches decides; when none does, the connection is allowed
(the issue's "outbound except the farm itself").

Whatever the policy, the farm is carved out first (:class:`Protected`): other desktops, the nodes, the database
and the networks the farm owner forbids (``network.egress.forbidden``); the node itself only answers DNS.
The same :func:`decide` explains a decision (``deckard desktop explain-network``) that the node's packet filter
(``drivers/firewall.py``) enforces, rule for rule.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from deckard.model.errors import BadInput

Action = Literal["allow", "deny"]
Proto = Literal["any", "tcp", "udp", "icmp"]
PROTOS: tuple[Proto, ...] = ("tcp", "udp", "icmp")
MAX_RULES = 64
MAX_TEXT = 4000
MAX_PORT_ITEMS = 16
ANY = ipaddress.IPv4Network("0.0.0.0/0")
DNS_PORT = 53


def _bad(message: str) -> BadInput:
    return BadInput(message, code="bad_egress_policy")


@dataclass(frozen=True)
class Rule:
    action: Action
    proto: Proto
    net: ipaddress.IPv4Network
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges; () = every port

    @property
    def text(self) -> str:
        words: list[str] = [self.action]
        if self.proto != "any":
            words.append(self.proto)
        words.append(
            "any" if self.net == ANY else str(self.net) if self.net.prefixlen < 32 else str(self.net.network_address)
        )
        if self.ports:
            words.append("port " + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ports))
        return " ".join(words)

    def matches(self, dest: ipaddress.IPv4Address, proto: Proto, port: int | None) -> bool:
        if dest not in self.net:
            return False
        if self.proto != "any" and self.proto != proto:
            return False
        if self.ports:
            return port is not None and any(a <= port <= b for a, b in self.ports)
        return True


def _ports(text: str) -> tuple[tuple[int, int], ...]:
    items = text.split(",")
    if len(items) > MAX_PORT_ITEMS:
        raise _bad(f"at most {MAX_PORT_ITEMS} ports or ranges in one rule")
    out = []
    for item in items:
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise _bad(f"bad port {item!r}: use a number 1-65535 or a range such as 8000-8080")
        a, b = int(lo), int(hi or lo)
        if not 1 <= a <= b <= 65535:
            raise _bad(f"bad port {item!r}: ports are 1-65535 and a range goes upwards")
        out.append((a, b))
    return tuple(out)


def _net(word: str) -> ipaddress.IPv4Network:
    if word == "any":
        return ANY
    try:
        return ipaddress.IPv4Network(word, strict=True)
    except ValueError as exc:
        raise _bad(
            f"bad destination {word!r}: use `any`, an IPv4 address or a network such as 10.0.0.0/8 ({exc})"
        ) from None


def parse_rule(text: str) -> Rule:
    words = text.split()
    if not words or words[0] not in ("allow", "deny"):
        raise _bad(f"rule {text!r} must start with `allow` or `deny`")
    action: Action = "allow" if words[0] == "allow" else "deny"
    rest = words[1:]
    proto: Proto = "any"
    if rest and rest[0] in PROTOS:
        proto = rest.pop(0)  # type: ignore[assignment]
    if not rest:
        raise _bad(f"rule {text!r} names no destination: add `any`, an address or a network")
    net = _net(rest.pop(0))
    ports: tuple[tuple[int, int], ...] = ()
    if rest and rest[0] == "port":
        if proto not in ("tcp", "udp"):
            raise _bad(f"rule {text!r}: ports need `tcp` or `udp` before the destination")
        if len(rest) < 2:
            raise _bad(f"rule {text!r}: `port` needs a list such as 80,443 or 8000-8080")
        ports = _ports(rest[1])
        rest = rest[2:]
    if rest:
        raise _bad(f"rule {text!r}: unexpected {' '.join(rest)!r}")
    return Rule(action, proto, net, ports)


@lru_cache(maxsize=256)
def parse_policy(text: str) -> tuple[Rule, ...]:
    """The rules of a policy text, in order; BadInput ``bad_egress_policy`` saying what is wrong and where."""
    if len(text) > MAX_TEXT:
        raise _bad(f"an egress policy is at most {MAX_TEXT} characters")
    rules = []
    for line in text.replace(";", "\n").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            rules.append(parse_rule(line))
    if len(rules) > MAX_RULES:
        raise _bad(f"an egress policy has at most {MAX_RULES} rules (this one has {len(rules)})")
    return tuple(rules)


def policy_text(rules: Iterable[Rule]) -> str:
    """The canonical text of rules (what the node applies and ``explain`` quotes)."""
    return "; ".join(r.text for r in rules)


def parse_forbidden(text: str) -> tuple[ipaddress.IPv4Network, ...]:
    """``network.egress.forbidden``: comma-separated addresses or networks."""
    out = []
    for word in text.replace(",", " ").split():
        net = _net(word)
        if net == ANY:
            raise _bad("`any` cannot be forbidden: deny it in the tenants' policies instead")
        out.append(net)
    return tuple(out)


@dataclass(frozen=True)
class Protected:
    """What a desktop can never reach, with a reason for each; ``gateway`` answers DNS only."""

    desktops: ipaddress.IPv4Network  # the farm's desktop network (other desktops, the nodes' bridge addresses)
    gateway: ipaddress.IPv4Address  # this node on the bridge: its resolver answers DNS
    hosts: tuple[tuple[ipaddress.IPv4Network, str], ...] = ()  # nodes, database: (address/32, what it is)
    forbidden: tuple[ipaddress.IPv4Network, ...] = ()  # the farm owner's list

    def farm_reason(self, dest: ipaddress.IPv4Address) -> str | None:
        for net, what in self.hosts:
            if dest in net:
                return f"{dest} is {what}: desktops never reach the farm's own machines"
        if dest in self.desktops:
            return f"{dest} is in the farm's desktop network {self.desktops}: desktops never reach each other or a node"
        for net in self.forbidden:
            if dest in net:
                return f"{dest} is in {net}, which the farm forbids to every desktop (network.egress.forbidden)"
        return None

    def networks(self) -> list[ipaddress.IPv4Network]:
        return [self.desktops, *(net for net, _ in self.hosts), *self.forbidden]


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    decided_by: Literal["resolver", "farm", "rule", "default"]
    reason: str
    rule: str | None = None  # the deciding rule's text
    index: int | None = None  # its position, from 1
    source: str = ""  # the layer the policy came from: osf, tenant, global, default
    extra: dict[str, str] = field(default_factory=dict)


def decide(
    rules: Sequence[Rule],
    protected: Protected,
    dest: ipaddress.IPv4Address,
    proto: Proto = "tcp",
    port: int | None = None,
    *,
    source: str = "",
) -> Verdict:
    """Whether a desktop under ``rules`` may open a connection to ``dest`` (and why), as the node decides it."""
    if dest == protected.gateway:
        if proto in ("tcp", "udp") and port == DNS_PORT:
            return Verdict(True, "resolver", f"{dest} is the node's DNS resolver", source=source)
        return Verdict(False, "farm", f"{dest} is this node: desktops reach only its DNS resolver", source=source)
    farm = protected.farm_reason(dest)
    if farm is not None:
        return Verdict(False, "farm", farm, source=source)
    for i, rule in enumerate(rules, 1):
        if rule.matches(dest, proto, port):
            verb = "allows" if rule.action == "allow" else "denies"
            return Verdict(
                rule.action == "allow", "rule", f"rule {i} `{rule.text}` {verb} it", rule.text, i, source=source
            )
    return Verdict(True, "default", "no rule matches: outbound connections are allowed by default", source=source)


def opens_farm(rules: Sequence[Rule], protected: Protected) -> Rule | None:
    """The first ``allow`` rule whose whole destination is the farm's (it could only mean to open the farm)."""
    farm = protected.networks()
    for rule in rules:
        if rule.action == "allow" and rule.net != ANY and any(rule.net.subnet_of(net) for net in farm):
            return rule
    return None
