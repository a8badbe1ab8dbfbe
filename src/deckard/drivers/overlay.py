"""The desktop network across machines: one VXLAN segment (the kernel's ``vxlan`` device) joined to the bridge.

Every node of a multi-machine farm puts a VXLAN port on its desktop bridge; the ports of all nodes form one
layer-2 segment over the machines' own network (the *underlay*), so a desktop keeps its address wherever it
starts and any node's broker reaches any desktop.  Unicast VXLAN with head-end replication: each peer node is an
all-zeros forwarding entry (``bridge fdb append 00:00:00:00:00:00 dst PEER``) that floods broadcasts (ARP) to
it, and the bridge learns where each desktop's MAC lives from the replies.  No multicast on the underlay.

Addresses on the segment:

* the **gateway** (the range's first address) is *anycast*: every node has it, as ``/32``, and answers for it
  only to its own desktops: ARP for the gateway never crosses the VXLAN port.  A desktop's DNS, metadata and
  egress go through the node it runs on;
* each node has an address of its own on the segment (``node_address``, counted from the top of the range by
  node id), which is the source of its broker's connections to desktops: a desktop on another machine answers
  the node that called it.

What the VXLAN port may carry (a bridge-family nftables table, ``deckard_overlay_<bridge>``): frames between a
node's address and a desktop, ARP between them, nothing else.  Two desktops never talk over the overlay (they
do not on one node either: their ports are isolated), and a desktop never reaches another node.  Frames that
came in through the VXLAN port from a node's address carry ``OVERLAY_MARK`` into the inet filter
(``drivers/firewall.py``), which lets those connections (and only their replies) past the egress policy.

The underlay must carry 50 bytes more than the desktops' MTU (1550 for 1500): the VXLAN port gets MTU 1500
so that it never lowers the bridge's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import structlog

from deckard.drivers.firewall import OVERLAY_MARK, load_text, whole_table
from deckard.drivers.network import IFNAMSIZ, link_exists, run_batch, run_command
from deckard.model.errors import DriverError
from deckard.model.network import gateway_of

log = structlog.get_logger()

VXLAN_PORT = 4789  # IANA's
ZERO_MAC = "00:00:00:00:00:00"


def node_address(network: str, node_id: int) -> str:
    """The node's own address on the desktop segment: the ``node_id``-th host from the top of the range (desktops
    are numbered from the bottom, so the two meet only in a full range)."""
    hosts = ipaddress.IPv4Network(network).num_addresses - 2
    if not 1 <= node_id <= hosts // 4:
        raise DriverError(
            f"node id {node_id} has no address in the desktop network {network}: widen network.range",
            code="no_node_address",
        )
    return str(ipaddress.IPv4Network(network).broadcast_address - node_id)


def node_addresses(network: str, node_ids: Iterable[int]) -> list[str]:
    return [node_address(network, i) for i in sorted(set(node_ids))]


def vxlan_name(bridge: str) -> str:
    name = f"vx{bridge}"
    return name if len(name) <= IFNAMSIZ else "vx" + re.sub(r"[^a-z0-9]", "", bridge)[-(IFNAMSIZ - 2) :]


def table_name(bridge: str) -> str:
    return "deckard_overlay_" + re.sub(r"[^A-Za-z0-9_]", "_", bridge)


@dataclass(frozen=True)
class Segment:
    """One node's view of the segment: its bridge, the range, the VXLAN id, its underlay address, its peers'."""

    bridge: str
    network: str
    vni: int
    local: str  # this node's underlay address
    nodes: tuple[str, ...]  # every node's address on the segment (``node_address``), this one's included

    @property
    def gateway(self) -> str:
        return gateway_of(self.network)

    def render_filter(self) -> str:
        """The bridge-family table that keeps the VXLAN port to node ↔ desktop traffic."""
        vx, gw = vxlan_name(self.bridge), self.gateway
        nodes = "{ " + ", ".join(self.nodes) + " }" if self.nodes else "{ 0.0.0.0 }"
        return whole_table(
            "bridge",
            table_name(self.bridge),
            [
                f"  set nodes {{ type ipv4_addr; elements = {nodes} }}",
                "  chain in_from_overlay {",
                "    type filter hook prerouting priority -200; policy accept;",
                f'    iifname != "{vx}" accept',
                f"    arp daddr ip {gw} drop",  # every node is the gateway: each answers for it on its own
                f"    arp saddr ip {gw} drop",
                "    arp saddr ip @nodes accept",
                "    arp daddr ip @nodes accept",
                f"    ip saddr @nodes meta mark set {OVERLAY_MARK:#x} accept",
                "    ip daddr @nodes accept",
                "    drop",
                "  }",
                "  chain out_to_overlay {",
                "    type filter hook forward priority -200; policy accept;",
                f'    oifname != "{vx}" accept',
                f"    arp daddr ip {gw} drop",
                f"    arp saddr ip {gw} drop",
                "    arp saddr ip @nodes accept",
                "    arp daddr ip @nodes accept",
                "    ip saddr @nodes accept",
                "    ip daddr @nodes accept",
                "    drop",
                "  }",
                "  chain out_from_node {",
                "    type filter hook output priority -200; policy accept;",
                f'    oifname != "{vx}" accept',
                f"    arp daddr ip {gw} drop",
                f"    arp saddr ip {gw} drop",
                "  }",
            ],
        )


async def join(segment: Segment, me: str, peers: Iterable[str]) -> None:
    """Make this node part of the segment: the VXLAN port on the bridge, the anycast gateway as ``/32`` and the
    node's own address ``me`` as the bridge's primary address, the peers' flooding entries, the filter.
    Idempotent: the node calls it at start and whenever the farm's nodes change."""
    vx = vxlan_name(segment.bridge)
    prefix = ipaddress.IPv4Network(segment.network).prefixlen
    if not link_exists(vx):
        vxlan = f"type vxlan id {segment.vni} local {segment.local} dstport {VXLAN_PORT}"
        await run_command(["ip", "link", "add", vx, *vxlan.split()])
        log.info("network.overlay_created", vxlan=vx, vni=segment.vni, local=segment.local)
    await run_command(["ip", "link", "set", vx, "mtu", "1500", "master", segment.bridge, "up"])
    await load_text(table_name(segment.bridge), segment.render_filter())
    # the gateway shrinks to /32 and the node's own address carries the range (the source of its connections);
    # in this order: deleting a primary address deletes the secondaries of its subnet with it
    await run_command(["ip", "addr", "del", f"{segment.gateway}/{prefix}", "dev", segment.bridge], check=False)
    await run_command(["ip", "addr", "replace", f"{me}/{prefix}", "dev", segment.bridge])
    await run_command(["ip", "addr", "replace", f"{segment.gateway}/32", "dev", segment.bridge])
    await set_peers(vx, peers)


def _fdb(text: str) -> list[tuple[str, str, bool]]:
    """``bridge fdb show dev VX`` → (MAC, underlay destination, permanent) of the device's own entries."""
    entries = []
    for line in text.splitlines():
        mac, _, rest = line.partition(" ")
        if m := re.search(r"\bdst (\S+)", rest):
            entries.append((mac, m.group(1), "permanent" in rest.split()))
    return entries


async def set_peers(vx: str, peers: Iterable[str]) -> None:
    """The flooding entries: exactly one per peer's underlay address.  A peer that leaves (a lost machine) takes
    the MACs learned behind it along: frames for a desktop that ran there flood to the live peers, reaching the
    machine it starts on next, instead of going to one that may be powered off until the entry ages (300 s)."""
    want = set(peers)
    entries = _fdb((await run_command(["bridge", "fdb", "show", "dev", vx])).stdout)
    have = {dst for mac, dst, _ in entries if mac == ZERO_MAC}
    for peer in sorted(want - have):
        await run_command(["bridge", "fdb", "append", ZERO_MAC, "dev", vx, "dst", peer])
        log.info("network.overlay_peer_added", vxlan=vx, peer=peer)
    for peer in sorted(have - want):
        await run_command(["bridge", "fdb", "del", ZERO_MAC, "dev", vx, "dst", peer], check=False)
        log.info("network.overlay_peer_removed", vxlan=vx, peer=peer)
    behind = sorted(mac for mac, dst, permanent in entries if mac != ZERO_MAC and not permanent and dst not in want)
    await forget_macs(vx, behind)


async def forget_macs(vx: str, macs: Sequence[str]) -> None:
    """Drop what the VXLAN port learned about where ``macs`` live (one ``bridge -batch``): the next frame to one
    floods to every peer and the answer teaches the new place."""
    if not macs:
        return
    await run_batch("bridge", (f"fdb del {mac} dev {vx} self" for mac in macs))
