"""Desktop addressing: fixed IPs in the desktop range and MACs derived from them (QVD's 54:52:00 + 3 octets).

The MAC is a function of the IP so that re-creating a guest with the same IP never leaves a stale ARP entry
on the bridge (reference/platform.md, "Stale ARP").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from deckard.model.errors import Conflict


def mac_for_ip(ip: str) -> str:
    octets = ipaddress.IPv4Address(ip).packed[1:]
    return "54:52:00:" + ":".join(f"{b:02x}" for b in octets)


def first_free_ip(network: str, gateway: str, used: Iterable[str], *, reserved: int = 10) -> str:
    """The lowest address of ``network`` not in ``used``; the first ``reserved`` hosts are for nodes."""
    net = ipaddress.IPv4Network(network)
    taken = set(used) | {gateway}
    for i, host in enumerate(net.hosts()):
        if i < reserved:
            continue
        if str(host) not in taken:
            return str(host)
    raise Conflict(f"the desktop network {network} is full; widen it (network.range)", code="network_full")


def gateway_of(network: str) -> str:
    return str(next(ipaddress.IPv4Network(network).hosts()))


def prefix_len(network: str) -> int:
    return ipaddress.IPv4Network(network).prefixlen
