"""The node's packet filter for its desktops: one nftables table per farm bridge, replaced atomically.

What the table says (``docs/networking.md``):

* **input** from the bridge: a desktop may ask the node's DNS resolver (port 53 on the gateway address) and its
  metadata service (``METADATA_PORT``), and answer what the node opened (the agent, the display); everything
  else it sends to the node is dropped — the API, the broker, the database, ssh.
* **prerouting** from the bridge: the well-known metadata address (``169.254.169.254`` port 80) is the node's
  metadata service on the gateway address (``node/metadata.py``).
* **forward** from the bridge: IPv6 is dropped; the farm's own networks (other desktops, the nodes, the
  database, the farm owner's forbidden list) are rejected; then each desktop jumps to its policy's chain (a
  verdict map from its address) whose rules are the egress policy in order, ending in ``accept``.  Every
  packet a desktop sends is judged, not only the first of a connection, so a deny cuts open connections too.
  A desktop the table does not know sends nothing.  Nothing from outside may open a connection to a desktop.
* **postrouting**: desktops leave through the node's uplink masqueraded as the node.

The table is rendered whole from the node's current view and loaded with one ``nft -f`` transaction (the
table is created, deleted and defined again in the same transaction), so a reader never sees half a policy.
Why nftables and not iptables: atomic replacement, verdict maps and one table a farm owns alone; a second farm
on the same machine has another bridge, hence another table.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from deckard.drivers import nftlib
from deckard.drivers.network import run_command
from deckard.model.egress import ANY, Protected, Rule
from deckard.model.errors import DriverError
from deckard.model.guest_metadata import METADATA_ADDRESS, METADATA_PORT

log = structlog.get_logger()

REJECT = "reject with icmpx type admin-prohibited"
# set by the overlay's bridge filter (``drivers/overlay.py``) on frames that came through the VXLAN port from a
# node's address: a broker on another machine calling a desktop here; its connection (and only its) passes
OVERLAY_MARK = 0x6B76


def table_name(bridge: str) -> str:
    return "deckard_" + re.sub(r"[^A-Za-z0-9_]", "_", bridge)


def policy_chain(rules: Sequence[Rule]) -> str:
    """The chain of one distinct policy: named by its canonical text, so equal policies share it."""
    digest = hashlib.sha256("; ".join(r.text for r in rules).encode()).hexdigest()[:12]
    return f"policy_{digest}"


def _rule(rule: Rule) -> str:
    parts = []
    if rule.net != ANY:
        parts.append(f"ip daddr {rule.net}")
    if rule.ports:
        ports = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in rule.ports)
        parts.append(f"{rule.proto} dport {{ {ports} }}")
    elif rule.proto != "any":
        parts.append(f"meta l4proto {rule.proto}")
    parts.append("accept" if rule.action == "allow" else REJECT)
    return " ".join(parts)


def whole_table(family: str, name: str, body: Iterable[str]) -> str:
    """A table's text that replaces it in one ``nft -f`` transaction: made (so the delete cannot fail), deleted,
    and defined again with ``body`` (its lines, indented)."""
    head = [f"table {family} {name}", f"delete table {family} {name}", f"table {family} {name} {{"]
    return "\n".join([*head, *body, "}"]) + "\n"


def elements(items: Sequence[str]) -> str:
    """A set's or map's ``elements = { … }`` clause (nothing for none: nft refuses an empty one)."""
    return f" elements = {{ {', '.join(items)} }}" if items else ""


def _set(networks: Sequence[ipaddress.IPv4Network]) -> str:
    """An interval set's elements: nft refuses overlapping ones, so nested networks are merged first."""
    return "{ " + ", ".join(str(n) for n in ipaddress.collapse_addresses(networks)) + " }"


@dataclass(frozen=True)
class Table:
    """What the node's filter must say: the bridge, the farm's protected networks, each desktop's policy."""

    bridge: str
    protected: Protected
    desktops: Mapping[str, tuple[Rule, ...]]  # desktop IP → its policy's rules
    metadata_port: int = METADATA_PORT  # the guests' metadata service on the gateway address
    overlay: bool = False  # the bridge has a VXLAN port (``drivers/overlay.py``)
    # policies whose chains exist before any desktop has them (a warm pool's: its take-over adds an address only)
    prepared: Sequence[tuple[Rule, ...]] = ()

    def render(self) -> str:
        name = table_name(self.bridge)
        gw = self.protected.gateway
        chains: dict[str, tuple[Rule, ...]] = {policy_chain(rules): rules for rules in self.prepared}
        verdicts = []
        for ip, rules in sorted(self.desktops.items()):
            chain = policy_chain(rules)
            chains[chain] = rules
            verdicts.append(f"{ip} : jump {chain}")
        out = [
            "  set farm { type ipv4_addr; flags interval; elements = " + _set(self.protected.networks()) + " }",
            "  map desktops { type ipv4_addr : verdict;" + elements(verdicts) + " }",
            "  chain input {",
            "    type filter hook input priority filter; policy accept;",
            f'    iifname "{self.bridge}" jump from_desktop_to_node',
            "  }",
            "  chain from_desktop_to_node {",
            "    ct state established,related accept",
            "    meta nfproto ipv6 drop",
            f"    ip daddr {gw} udp dport 53 accept",
            f"    ip daddr {gw} tcp dport 53 accept",
            f"    ip daddr {gw} icmp type echo-request accept",
            f"    ip daddr {gw} tcp dport {self.metadata_port} accept",
            "    drop",
            "  }",
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            f'    iifname "{self.bridge}" ip daddr {METADATA_ADDRESS} tcp dport 80'
            f" dnat ip to {gw}:{self.metadata_port}",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            *(
                [
                    f"    meta mark {OVERLAY_MARK:#x} ct mark set {OVERLAY_MARK:#x} accept",
                    f"    ct mark {OVERLAY_MARK:#x} accept",
                ]
                if self.overlay
                else []
            ),
            f'    iifname "{self.bridge}" jump from_desktop',
            f'    oifname "{self.bridge}" ct state established,related accept',
            f'    oifname "{self.bridge}" drop',
            "  }",
            "  chain from_desktop {",
            "    meta nfproto ipv6 drop",
            "    ct state related accept",
            f"    ip daddr @farm {REJECT}",
            "    ip saddr vmap @desktops",
            "    drop",
            "  }",
        ]
        for chain, rules in sorted(chains.items()):
            out.append(f"  chain {chain} {{")
            out.extend(f"    {_rule(r)}" for r in rules)
            out.extend(["    accept", "  }"])
        out += [
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f'    ip saddr {self.protected.desktops} oifname != "{self.bridge}" masquerade',
            "  }",
        ]
        return whole_table("inet", name, out)


def available() -> bool:
    return shutil.which("nft") is not None


def render_port_guard(port: str, mac: str, ip: str) -> str:
    """A bridge-family table that lets only the guest's own MAC and IPv4 address in through its port.

    Root in a VM owns its kernel and could send with any address: another desktop's, to take its egress policy
    or its metadata (both are decided by source address), or poison the node's neighbour table.  A container
    cannot (no ``CAP_NET_RAW`` or ``CAP_NET_ADMIN``), a VM needs this.  IPv4 and ARP only: the desktop network
    has no IPv6.
    """
    return (
        "\n".join(
            [
                f"table bridge {guard_name(port)} {{",
                "  chain from_guest {",
                "    type filter hook prerouting priority -300; policy accept;",
                f'    iifname "{port}" ether saddr != {mac} drop',
                f'    iifname "{port}" ether type != {{ ip, arp }} drop',
                f'    iifname "{port}" ip saddr != {ip} drop',
                f'    iifname "{port}" arp saddr ether != {mac} drop',
                f'    iifname "{port}" arp saddr ip != {ip} drop',
                "  }",
                "}",
            ]
        )
        + "\n"
    )


def guard_name(port: str) -> str:
    return f"deckard_guard_{port}"


async def guard_port(port: str, mac: str, ip: str) -> None:
    """Load :func:`render_port_guard` for a guest's port (replacing an older one); DriverError when nft refuses."""
    await remove_port_guard(port)
    await load_text(guard_name(port), render_port_guard(port, mac, ip))


async def remove_port_guard(port: str) -> None:
    if available():
        await run_nft(f"delete table bridge {guard_name(port)}\n")


async def load(bridge: str, text: str) -> None:
    """Load a rendered table (``Table.render``) in one transaction (DriverError ``firewall_failed`` quoting nft
    on failure)."""
    await load_text(table_name(bridge), text)


async def load_text(name: str, text: str, *, netns: str | None = None) -> None:
    """Load a table's text with one ``nft -f`` (in network namespace ``netns`` if given)."""
    if not available():
        raise DriverError(
            "nft is not installed: desktops would have no network policy; install the nftables package",
            code="firewall_unavailable",
        )
    returncode, stderr = await run_nft(text, name=name, netns=netns)
    if returncode != 0:
        raise DriverError(f"nft refused the desktop filter: {stderr.strip()[-500:]}", code="firewall_failed")


async def run_nft(commands: str, *, name: str = "commands", netns: str | None = None) -> tuple[int, str]:
    """Run ``commands`` (``nft -f``'s language) as one transaction: in this process through libnftables
    (``drivers/nftlib.py``), or with the ``nft`` command in network namespace ``netns`` or without the library.
    Returns nft's exit status and error text."""
    if netns is None:
        done = await nftlib.run(commands)
        if done is not None:
            return done.returncode, done.stderr
    fd, path = tempfile.mkstemp(prefix=f".{name}-", suffix=".nft")  # nodes may share a bridge
    tmp = Path(path)
    with os.fdopen(fd, "w") as f:
        f.write(commands)
    try:
        inside = ["ip", "netns", "exec", netns] if netns else []
        result = await run_command([*inside, "nft", "-f", str(tmp)], check=False)
    finally:
        tmp.unlink(missing_ok=True)
    return result.returncode, result.stderr


async def add_desktop(bridge: str, ip: str, chain: str) -> None:
    """Add one desktop to the loaded table's verdict map, its policy's chain already there: one element (~0.2 ms
    in this process) instead of loading the whole table.  DriverError ``firewall_failed`` if nft refuses (the
    chain is missing, the address is mapped to another chain)."""
    if not available():
        raise DriverError("nft is not installed", code="firewall_unavailable")
    returncode, stderr = await run_nft(f"add element inet {table_name(bridge)} desktops {{ {ip} : jump {chain} }}\n")
    if returncode != 0:
        raise DriverError(f"nft refused the desktop {ip}: {stderr.strip()[-300:]}", code="firewall_failed")


async def remove(bridge: str) -> None:
    """Remove the bridge's filter (tests, a farm taken down for good) and any older guard chain."""
    await remove_legacy_guard(bridge)
    if available():
        await run_nft(f"delete table inet {table_name(bridge)}\n")


async def remove_legacy_guard(bridge: str) -> None:
    """Remove the iptables guard chain of releases before the nftables filter (the filter replaces it)."""
    if not shutil.which("iptables"):
        return
    chain = f"DECKARD-{bridge}"[:28]
    if (await run_command(["iptables", "-L", chain, "-n"], check=False)).returncode != 0:
        return
    for hook in ("INPUT", "FORWARD"):
        while (await run_command(["iptables", "-D", hook, "-i", bridge, "-j", chain], check=False)).returncode == 0:
            pass
    await run_command(["iptables", "-F", chain], check=False)
    await run_command(["iptables", "-X", chain], check=False)


async def enable_forwarding() -> None:
    """Desktops reach out through the node: IPv4 forwarding on (the filter above decides what passes)."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    if path.read_text().strip() != "1":
        path.write_text("1\n")
        log.info("network.forwarding_enabled")
