"""A tenant network on one node: its own layer 2 and layer 3, in a network namespace, behind the farm network.

A tenant's private (or a shared) network has its own address range, which may be the same as another tenant's.
The node cannot route two equal ranges in its own namespace, so each network it runs desktops of gets:

* a **bridge** in the host namespace (``tb…``), no address on it: the network's desktops' ports, isolated as on
  the farm bridge (a desktop reaches only its gateway);
* a **network namespace** (``deckard-<scope>-net<id>``) holding the network's gateway on ``gw`` (a veth whose
  other end is a port of that bridge) and a leg on the farm bridge, ``up`` (a veth whose other end is an
  isolated port of the farm bridge);
* a **1:1 NAT** in that namespace between each desktop's address in its network (``network_ip``) and its
  *farm address* (``ip``, from the farm's range, unique in the farm): ``up`` holds the farm addresses, so
  the broker, the agent calls and every node's pings reach a desktop at its farm address exactly as they reach
  one on the farm network, on this machine or (over the farm's VXLAN overlay) another; what a desktop sends out
  leaves ``up`` from its farm address.

So the farm network's filter (``drivers/firewall.py``) judges a tenant desktop's traffic by its farm address,
with its own egress policy, the farm's protected addresses and the node's services (DNS is the farm gateway's,
which the namespace forwards to from the network's gateway; the metadata address goes out as any other).
Nothing of one tenant network can reach another: their namespaces share nothing, the farm filter rejects a
desktop's traffic to other desktops' farm addresses, and no route leads from one range to another.

Desktops of one network never talk to each other (as on the farm network), so a network needs no segment
across machines: each node has its own copy of the bridge and gateway (``docs/networking.md``).

Each node owns its namespaces (their names carry a hash of the farm bridge and the node name): two nodes of one
machine never share or fight over one.  The namespace outlives the node daemon, as its desktops do.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from deckard.drivers.firewall import elements, load_text, run_nft, whole_table
from deckard.drivers.network import isolate_port, link_exists, run_command
from deckard.model.errors import DriverError
from deckard.model.network import gateway_of, network_gateway, prefix_len

log = structlog.get_logger()

NETNS_DIR = Path("/run/netns")
TABLE = "deckard_tenant"


@dataclass(frozen=True)
class Names:
    """What a node calls one tenant network's pieces on this machine."""

    farm_bridge: str
    scope: str  # ``scope_of`` the farm bridge and the node
    network_id: int

    @property
    def netns(self) -> str:
        return f"{_prefix(self.farm_bridge)}{self.scope}-net{self.network_id}"

    @property
    def bridge(self) -> str:  # host namespace: the desktops' ports
        return f"tb{self.scope}{self.network_id}"

    @property
    def gw_port(self) -> str:  # host namespace: the bridge's port to the namespace's ``gw``
        return f"tg{self.scope}{self.network_id}"

    @property
    def up_port(self) -> str:  # host namespace: the farm bridge's port to the namespace's ``up``
        return f"tu{self.scope}{self.network_id}"

    @property
    def vlan_port(self) -> str:  # host namespace: a flat network's VLAN interface on the node interface
        return f"tv{self.scope}{self.network_id}"


def scope_of(farm_bridge: str, node_name: str) -> str:
    """Five hex digits that tell this node's namespaces and links from another node's or farm's on the machine."""
    return hashlib.sha256(f"{farm_bridge}/{node_name}".encode()).hexdigest()[:5]


def names(farm_bridge: str, node_name: str, network_id: int) -> Names:
    assert 0 < network_id < 10**8, "network ids fit in eight digits (interface names have 15 characters)"
    return Names(farm_bridge, scope_of(farm_bridge, node_name), network_id)


def _prefix(farm_bridge: str) -> str:
    return f"deckard-{farm_bridge}-"


def existing(farm_bridge: str, node_name: str) -> set[int]:
    """The networks this node has a namespace for (made by an earlier run included)."""
    scope = scope_of(farm_bridge, node_name)
    return {n.network_id for n in _namespaces(farm_bridge) if n.scope == scope}


def _namespaces(farm_bridge: str) -> list[Names]:
    """Every tenant namespace of the farm's nodes on this machine."""
    prefix = _prefix(farm_bridge)
    found = []
    for path in NETNS_DIR.glob(prefix + "*") if NETNS_DIR.is_dir() else ():
        scope, _, tail = path.name[len(prefix) :].partition("-net")
        if tail.isdigit():
            found.append(Names(farm_bridge, scope, int(tail)))
    return found


def host_table(scope: str) -> str:
    return f"deckard_tenant_{scope}"


def render_host_table(scope: str) -> str:
    """The host's table for a node's tenant bridges: their bridged frames untracked (see ``ensure``)."""
    return whole_table(
        "inet",
        host_table(scope),
        [
            "  chain prerouting {",
            "    type filter hook prerouting priority raw; policy accept;",
            f'    iifname "tb{scope}*" notrack',
            "  }",
        ],
    )


@dataclass(frozen=True)
class TenantNetwork:
    """One network as a node sets it up: its range, and the farm network its namespace hangs from.

    A **flat** network (``flat`` set) is a network of the machines' own: the bridge also holds the node interface
    it is on (or a VLAN interface on it), its desktops use its own router, and the namespace is only the farm's
    way in: it holds the node's address in the range (``Flat.own``) and sends the farm's connections to a
    desktop from there."""

    network_id: int
    range: str  # the network's own range (its gateway is the first address, or a flat network's router)
    farm_bridge: str
    farm_range: str
    flat: Flat | None = None

    @property
    def gateway(self) -> str:
        return network_gateway(self.range, self.flat.router if self.flat else None)

    @property
    def farm_gateway(self) -> str:
        return gateway_of(self.farm_range)

    def render_table(self, desktops: Mapping[str, str]) -> str:
        """The namespace's nftables table: ``desktops`` maps each farm address to its address in the network."""
        gw, farm_gw = self.gateway, self.farm_gateway
        pairs = sorted(desktops.items())
        if self.flat is None:  # the namespace is the desktops' gateway: DNS to the farm's resolver, egress out
            inward = [
                f'    iifname "gw" ip daddr {gw} udp dport 53 dnat ip to {farm_gw}',
                f'    iifname "gw" ip daddr {gw} tcp dport 53 dnat ip to {farm_gw}',
            ]
            outward = ['    oifname "up" snat ip to ip saddr map @from_desktop']
            # out: a desktop this node runs, to the farm network (whose filter judges it)
            forward = ['    iifname "gw" oifname "up" ip saddr @desktops accept']
            answer = gw
        else:  # desktops go out through their own router: the farm's calls come from the node's address
            inward, forward, answer = [], [], self.flat.own
            outward = [f'    oifname "gw" ct status dnat snat ip to {self.flat.own}']
        return whole_table(
            "ip",
            TABLE,
            [
                "  map to_desktop { type ipv4_addr : ipv4_addr;" + elements([f"{a} : {b}" for a, b in pairs]) + " }",
                "  map from_desktop { type ipv4_addr : ipv4_addr;" + elements([f"{b} : {a}" for a, b in pairs]) + " }",
                "  set desktops { type ipv4_addr;" + elements(sorted(desktops.values())) + " }",
                "  chain prerouting {",
                "    type nat hook prerouting priority dstnat; policy accept;",
                '    iifname "up" dnat ip to ip daddr map @to_desktop',
                *inward,
                "  }",
                "  chain postrouting {",
                "    type nat hook postrouting priority srcnat; policy accept;",
                *outward,
                "  }",
                "  chain forward {",
                "    type filter hook forward priority filter; policy drop;",
                *forward,
                # in: what the farm opened to a desktop at its farm address (and its answers back), and the
                # answers to what a desktop opened
                '    iifname "up" oifname "gw" ct status dnat accept',
                "    ct state established,related accept",
                "  }",
                "  chain input {",
                "    type filter hook input priority filter; policy drop;",
                "    ct state established,related accept",
                '    iifname "lo" accept',
                f'    iifname "gw" ip daddr {answer} icmp type echo-request accept',
                "  }",
            ],
        )


@dataclass(frozen=True)
class Flat:
    """What a flat network adds: the node interface, its VLAN tag, the network's router, the node's address."""

    interface: str
    vlan: int | None
    router: str
    own: str  # this node's address in the range (``overlay.node_address``: counted down from the top)


async def _plug_uplink(flat: Flat, n: Names) -> None:
    """A flat network's bridge gets the node interface it is on, or a VLAN interface on it."""
    if not link_exists(flat.interface):
        raise DriverError(
            f"this node has no interface {flat.interface!r} for flat network {n.network_id}: "
            "every node that may run its desktops needs one",
            code="network_unavailable",
        )
    port = flat.interface
    if flat.vlan is not None:
        port = n.vlan_port
        if not link_exists(port):
            made = await run_command(
                ["ip", "link", "add", "link", flat.interface, "name", port, "type", "vlan", "id", str(flat.vlan)],
                check=False,
            )
            if made.returncode != 0:
                raise DriverError(
                    f"cannot tag VLAN {flat.vlan} on {flat.interface} for flat network {n.network_id} "
                    f"({made.stderr.strip()}): this node's kernel needs 802.1Q support (module 8021q)",
                    code="network_unavailable",
                )
        await run_command(["ip", "link", "set", flat.interface, "up"])
    await run_command(["ip", "link", "set", port, "master", n.bridge, "up"])


async def ensure(net: TenantNetwork, n: Names) -> None:
    """Make the network's namespace, bridge and legs (idempotent: at every start of one of its desktops)."""
    if not (NETNS_DIR / n.netns).exists():
        await run_command(["ip", "netns", "add", n.netns])
        log.info("network.tenant_namespace_created", netns=n.netns, network_id=net.network_id, range=net.range)
    await run_command(["ip", "-n", n.netns, "link", "set", "dev", "lo", "up"])
    # forward between the legs; answer ARP on ``up`` only for ``up``'s own (farm) addresses; the answers to
    # what the farm opened leave by the default route, not the leg they came in on
    await run_command(
        [
            "ip",
            "netns",
            "exec",
            n.netns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
        ]
    )
    # frames between a desktop and its gateway are the namespace's to judge; with br_netfilter loaded (its
    # switch is global: a bridge can only add itself) they also pass the host's IPv4 hooks, where a farm's
    # masquerade would rewrite them: the host does not track them, so no host NAT touches them
    await load_text(host_table(n.scope), render_host_table(n.scope))
    if not link_exists(n.bridge):
        await run_command(["ip", "link", "add", "name", n.bridge, "type", "bridge"])
    await run_command(["ip", "link", "set", n.bridge, "up"])
    if not link_exists(n.gw_port):
        await run_command(["ip", "link", "add", n.gw_port, "type", "veth", "peer", "name", "gw", "netns", n.netns])
    await run_command(["ip", "link", "set", n.gw_port, "master", n.bridge, "up"])
    mine = net.flat.own if net.flat else net.gateway
    await run_command(["ip", "-n", n.netns, "addr", "replace", f"{mine}/{prefix_len(net.range)}", "dev", "gw"])
    if net.flat is not None:
        await _plug_uplink(net.flat, n)
    await run_command(["ip", "-n", n.netns, "link", "set", "dev", "gw", "up"])
    if not link_exists(n.up_port):
        await run_command(["ip", "link", "add", n.up_port, "type", "veth", "peer", "name", "up", "netns", n.netns])
    await run_command(["ip", "link", "set", n.up_port, "master", net.farm_bridge, "up"])
    await isolate_port(n.up_port)  # like a desktop's port: it talks to the node, not to other desktops
    await run_command(["ip", "-n", n.netns, "link", "set", "dev", "up", "up"])
    await _default_route(net, n)


async def apply(net: TenantNetwork, n: Names, desktops: Mapping[str, str]) -> None:
    """Hold exactly ``desktops``' farm addresses on ``up`` and map them (farm address → address in the network)."""
    await load_text(TABLE, net.render_table(desktops), netns=n.netns)
    have = await _addresses(n.netns)
    for ip in sorted(set(desktops) - have):
        await run_command(["ip", "-n", n.netns, "addr", "add", f"{ip}/32", "dev", "up"])
    for ip in sorted(have - set(desktops)):
        await run_command(["ip", "-n", n.netns, "addr", "del", f"{ip}/32", "dev", "up"], check=False)
    await _default_route(net, n)  # the kernel drops it with ``up``'s last address


async def _default_route(net: TenantNetwork, n: Names) -> None:
    await run_command(
        ["ip", "-n", n.netns, "route", "replace", "default", "via", net.farm_gateway, "dev", "up", "onlink"]
    )


async def _addresses(netns: str) -> set[str]:
    out = (await run_command(["ip", "-n", netns, "-4", "-o", "addr", "show", "dev", "up"])).stdout
    found = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            found.add(str(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).ip))
    return found


async def remove(n: Names) -> None:
    """Take the network off this node (no desktop of it runs here any more): the namespace and both bridges' legs
    go with it."""
    await run_command(["ip", "netns", "del", n.netns], check=False)
    for link in (n.gw_port, n.up_port, n.vlan_port, n.bridge):
        if link_exists(link):
            await run_command(["ip", "link", "del", link], check=False)
    if not any(other.scope == n.scope for other in _namespaces(n.farm_bridge)):
        await run_nft(f"delete table inet {host_table(n.scope)}\n")
    log.info("network.tenant_namespace_removed", netns=n.netns)


async def remove_farm(farm_bridge: str) -> None:
    """Every tenant network of every node of the farm on this machine (tests, a farm taken down for good)."""
    for n in _namespaces(farm_bridge):
        await remove(n)
