"""The node's packet filter for its desktops: one nftables table per farm bridge, replaced atomically.

What the table says (``docs/networking.md``):

* **input** from the bridge: a desktop may ask the node's DNS resolver (port 53 on the gateway address) and
  answer what the node opened (the agent, the display); everything else it sends to the node is dropped —
  the API, the broker, the database, ssh.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from deckard.drivers.network import run_command
from deckard.model.egress import ANY, Protected, Rule
from deckard.model.errors import DriverError

log = structlog.get_logger()

REJECT = "reject with icmpx type admin-prohibited"


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


def _set(networks: Sequence[ipaddress.IPv4Network]) -> str:
    """An interval set's elements: nft refuses overlapping ones, so nested networks are merged first."""
    return "{ " + ", ".join(str(n) for n in ipaddress.collapse_addresses(networks)) + " }"


@dataclass(frozen=True)
class Table:
    """What the node's filter must say: the bridge, the farm's protected networks, each desktop's policy."""

    bridge: str
    protected: Protected
    desktops: Mapping[str, tuple[Rule, ...]]  # desktop IP → its policy's rules

    def render(self) -> str:
        name = table_name(self.bridge)
        gw = self.protected.gateway
        chains: dict[str, tuple[Rule, ...]] = {}
        elements = []
        for ip, rules in sorted(self.desktops.items()):
            chain = policy_chain(rules)
            chains[chain] = rules
            elements.append(f"{ip} : jump {chain}")
        out = [
            f"table inet {name}",
            f"delete table inet {name}",
            f"table inet {name} {{",
            "  set farm { type ipv4_addr; flags interval; elements = " + _set(self.protected.networks()) + " }",
            "  map desktops { type ipv4_addr : verdict;"
            + (" elements = { " + ", ".join(elements) + " }" if elements else "")
            + " }",
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
            "    drop",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
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
            "}",
        ]
        return "\n".join(out) + "\n"


def available() -> bool:
    return shutil.which("nft") is not None


async def load(bridge: str, text: str) -> None:
    """Load a rendered table (``Table.render``) in one transaction (DriverError ``firewall_failed`` quoting nft
    on failure)."""
    if not available():
        raise DriverError(
            "nft is not installed: desktops would have no network policy; install the nftables package",
            code="firewall_unavailable",
        )
    fd, name = tempfile.mkstemp(prefix=f".{table_name(bridge)}-", suffix=".nft")  # nodes may share a bridge
    tmp = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    try:
        result = await run_command(["nft", "-f", str(tmp)], check=False)
    finally:
        tmp.unlink(missing_ok=True)
    if result.returncode != 0:
        raise DriverError(f"nft refused the desktop filter: {result.stderr.strip()[-500:]}", code="firewall_failed")


async def remove(bridge: str) -> None:
    """Remove the bridge's filter (tests, a farm taken down for good) and any older guard chain."""
    await remove_legacy_guard(bridge)
    if available():
        await run_command(["nft", "delete", "table", "inet", table_name(bridge)], check=False)


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
