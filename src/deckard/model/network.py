"""Desktop addressing: fixed IPs in the desktop range and MACs derived from them (QVD's 54:52:00 + 3 octets), and the
rules of tenant networks: which ranges they may have, which may not overlap, and their VXLAN ids.

The MAC is a function of the IP so that re-creating a guest with the same IP never leaves a stale ARP entry
on the bridge (reference/platform.md, "Stale ARP").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from deckard.model.errors import BadInput, Conflict


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
    raise Conflict(
        f"the desktop network {network} is full: widen it (network.range, for the farm's default network) or put "
        "desktops on another network",
        code="network_full",
    )


def last_free_ip(network: str, used: Iterable[str], *, reserved: int = 10) -> str:
    """The highest free address of ``network``: warm guests take theirs from the top (``services/pools.py``), desktops
    from the bottom, so the two meet only when the range is nearly full."""
    net = ipaddress.IPv4Network(network)
    taken = set(used)
    for offset in range(net.num_addresses - 2, reserved, -1):  # the broadcast address and the nodes' hosts aside
        host = str(net.network_address + offset)
        if host not in taken:
            return host
    raise Conflict(f"the desktop network {network} is full: widen it (network.range)", code="network_full")


def gateway_of(network: str) -> str:
    return str(next(ipaddress.IPv4Network(network).hosts()))


NETWORK_KINDS = ("private", "shared", "flat")
FARM_KINDS = ("shared", "flat")  # no tenant: the farm's administrators make them and grant them to tenants


def network_gateway(network: str, router: str | None) -> str:
    """A desktop network's gateway (and resolver): a flat network's own router, else the range's first address
    (the node's, or a tenant network's namespace's)."""
    return router or gateway_of(network)


def prefix_len(network: str) -> int:
    return ipaddress.IPv4Network(network).prefixlen


# ---- tenant networks (docs/networking.md, "Tenant networks") ------------------------------------------------

PRIVATE_SPACES = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)
MIN_PREFIX, MAX_PREFIX = 16, 28  # 65,534 addresses at most, 14 at least (the first 10 are kept for nodes)


def validate_range(text: str) -> str:
    """``text`` as a normalised IPv4 CIDR (``10.1.0.0/24``) fit for a tenant network, else 422 ``bad_network_range``.

    Host bits must be zero (``10.1.0.5/24`` is refused: the admin meant something else), the prefix /16 to /28, and
    the range inside RFC 1918 space or the carrier-grade NAT space 100.64.0.0/10, never a public range.
    """
    allowed = (
        f"an IPv4 range /{MIN_PREFIX} to /{MAX_PREFIX} with no host bits set, inside 10.0.0.0/8, 172.16.0.0/12, "
        "192.168.0.0/16 or 100.64.0.0/10"
    )
    try:
        net = ipaddress.IPv4Network(text.strip(), strict=True)
    except ValueError:  # not IPv4, not CIDR, or host bits set
        raise BadInput(
            f"invalid network range {text!r}: give {allowed}, e.g. 10.1.0.0/24", code="bad_network_range"
        ) from None
    if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX or not any(net.subnet_of(s) for s in PRIVATE_SPACES):
        raise BadInput(f"network range {net} is not allowed: give {allowed}", code="bad_network_range")
    return str(net)


def overlapping(network: str, others: Mapping[str, str]) -> str | None:
    """The name of the first of ``others`` (name → range) whose range overlaps ``network``, or None."""
    net = ipaddress.IPv4Network(network)
    return next((name for name, other in others.items() if net.overlaps(ipaddress.IPv4Network(other))), None)


IFNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def validate_flat(range_: str, interface: str, vlan: int | None, gateway: str | None) -> tuple[str, int | None, str]:
    """A flat network's node interface, VLAN tag and router (default: the range's first address), checked;
    422 ``bad_flat_network`` says what is wrong."""
    if not interface or len(interface) > 15 or not set(interface) <= IFNAME_CHARS or interface in ("lo", ".", ".."):
        raise BadInput(
            f"invalid interface {interface!r}: the name of the node interface the network is on (eth1, bond0)",
            code="bad_flat_network",
        )
    if vlan is not None and not 1 <= vlan <= 4094:
        raise BadInput(f"VLAN tag {vlan} is out of range: 1 to 4094 (none: untagged)", code="bad_flat_network")
    net = ipaddress.IPv4Network(range_)
    router = gateway or gateway_of(range_)
    try:
        address = ipaddress.IPv4Address(router)
    except ValueError:
        raise BadInput(f"invalid gateway {router!r}: an IPv4 address in {net}", code="bad_flat_network") from None
    if address not in net or address in (net.network_address, net.broadcast_address):
        raise BadInput(f"gateway {router} is not a host address of {net}", code="bad_flat_network")
    return interface, vlan, str(address)
