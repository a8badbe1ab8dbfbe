"""Desktops' network policy: which egress rules and DNS search domains a desktop gets, what the farm protects,
and the explanation of one decision (``deckard desktop explain-network``).

The policy is configuration (``network.egress``, layered default → global → tenant → OSF), so the API, the CLI
and the WAT's configuration page set it like any key; the node (``node/egress.py``) reads it here for the
desktops it runs and turns it into its packet filter, and :func:`explain` answers with the same decision
function (``model/egress.py``) the filter is rendered from.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database, prepared
from deckard.model.egress import PROTOS, Protected, Rule, decide, opens_farm, parse_forbidden, parse_policy
from deckard.model.errors import BadInput
from deckard.model.network import gateway_of, network_gateway
from deckard.model.states import DesktopState
from deckard.services.config import ValueCheck, get_config, read_config, read_keys_sourced
from deckard.services.context import Actor, require
from deckard.services.desktops import find_desktop_id

d = t.desktops


@dataclass(frozen=True)
class DesktopNetwork:
    """One desktop's egress rules (and the layer they came from) and its DNS search domains."""

    rules: tuple[Rule, ...]
    source: str
    dns_search: str


@dataclass(frozen=True)
class TenantNetworkRow:
    """A tenant network as a node sets it up (``drivers/tenant_net.py``); ``interface`` set: a flat network."""

    network_id: int
    range: str
    interface: str | None = None
    vlan: int | None = None
    router: str | None = None  # a flat network's gateway

    @property
    def gateway(self) -> str:
        """The desktops' gateway (and resolver): the namespace's, or a flat network's router."""
        return network_gateway(self.range, self.router)


@dataclass(frozen=True)
class TenantAddress:
    """A desktop on a tenant network: the network and the desktop's address in it (its farm address is
    ``desktops.ip``)."""

    network: TenantNetworkRow
    address: str


def _network_row(row: Any) -> TenantNetworkRow:
    return TenantNetworkRow(
        int(row.network_id),
        str(row.range),
        row.interface,
        None if row.vlan is None else int(row.vlan),
        row.gateway,  # set for flat networks only
    )


def _tenant_columns() -> list[sa.ColumnElement[Any]]:
    nt = t.networks
    return [d.c.ip, d.c.network_ip, d.c.network_id, nt.c.range, nt.c.interface, nt.c.vlan, nt.c.gateway]


_TENANT_ADDRESS = prepared(  # built once: every start reads it (services/config.py says why)
    sa.select(*_tenant_columns())
    .join(t.networks, t.networks.c.id == d.c.network_id)
    .where(d.c.id == sa.bindparam("desktop_id"))
)


async def tenant_address(conn: AsyncConnection, desktop_id: int) -> TenantAddress | None:
    """None: the desktop is on the farm network."""
    row = (await conn.execute(_TENANT_ADDRESS, {"desktop_id": desktop_id})).first()
    if row is None or row.network_ip is None:
        return None
    return TenantAddress(_network_row(row), str(row.network_ip))


async def tenant_view(db: Database, node_id: int) -> dict[TenantNetworkRow, dict[str, str]]:
    """For a node's tenant networks: each network with a desktop placed on this node → {farm address: address in
    the network} of those desktops (each node has its own copy of a network)."""
    nt = t.networks
    out: dict[TenantNetworkRow, dict[str, str]] = {}
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.select(*_tenant_columns())
            .join(nt, nt.c.id == d.c.network_id)
            .where(d.c.node_id == node_id, d.c.state != DesktopState.STOPPED.value, d.c.network_ip.is_not(None))
        )
        for row in rows:
            out.setdefault(_network_row(row), {})[str(row.ip)] = str(row.network_ip)
    return out


NETWORK_KEYS = ("network.egress", "network.dns.search")


def desktop_network_of(values: dict[str, tuple[Any, str]]) -> DesktopNetwork:
    """A desktop's network settings from :data:`NETWORK_KEYS` as ``config.read_keys_sourced`` resolved them."""
    text, source = values["network.egress"]
    return DesktopNetwork(parse_policy(text), source, values["network.dns.search"][0])


async def read_desktop_network(conn: AsyncConnection, tenant_id: int, osf_id: int) -> DesktopNetwork:
    return desktop_network_of(await read_keys_sourced(conn, NETWORK_KEYS, tenant_id, osf_id))


async def osf_policy(db: Database, osf_id: int) -> tuple[Rule, ...]:
    """The egress policy the desktops of an OSF get (``network.egress`` for its tenant and the OSF): a warm pool's,
    loaded by the node ahead so a take-over only adds the desktop's address (node/egress.py ``prepare``)."""
    async with db.connect() as conn:
        tenant_id = (await conn.execute(sa.select(t.osfs.c.tenant_id).where(t.osfs.c.id == osf_id))).scalar_one()
        return (await read_desktop_network(conn, tenant_id, osf_id)).rules


async def farm_policy(db: Database) -> tuple[Rule, ...]:
    """The farm's own egress policy (``network.egress`` of the global layer), which every desktop whose tenant and
    OSF set none gets: loaded by each node at its start, so a first start only adds its desktop's address."""
    return parse_policy(await get_config(db, "network.egress"))


_db_hosts: dict[str, tuple[tuple[ipaddress.IPv4Network, str], ...]] = {}


async def database_hosts(url: str) -> tuple[tuple[ipaddress.IPv4Network, str], ...]:
    """The database server's IPv4 addresses (none for SQLite), resolved once per URL."""
    if url in _db_hosts:
        return _db_hosts[url]
    host = urlsplit(url).hostname if "://" in url and not url.startswith("sqlite") else None
    found: set[str] = set()
    if host:
        try:
            infos = await asyncio.to_thread(socket.getaddrinfo, host, None, socket.AF_INET)
            found = {str(info[4][0]) for info in infos}
        except OSError:
            found = set()
    hosts = tuple((ipaddress.IPv4Network(ip), "the farm's database") for ip in sorted(found))
    _db_hosts[url] = hosts
    return hosts


async def protected(conn: AsyncConnection, network: str, database_url: str) -> Protected:
    """What no desktop reaches: the desktop network, every node's address, the database, the forbidden list."""
    rows = await conn.execute(sa.select(t.nodes.c.name, t.nodes.c.address).where(t.nodes.c.address != ""))
    hosts: list[tuple[ipaddress.IPv4Network, str]] = []
    for row in rows:
        try:
            hosts.append((ipaddress.IPv4Network(row.address), f"node {row.name}"))
        except ValueError:
            continue  # a host name or IPv6: the node's own filter protects its local addresses anyway
    hosts += await database_hosts(database_url)
    forbidden = parse_forbidden(await read_config(conn, "network.egress.forbidden", None))
    return Protected(
        ipaddress.IPv4Network(network),
        ipaddress.IPv4Address(gateway_of(network)),
        tuple(hosts),
        forbidden,
    )


async def node_view(
    db: Database, node_id: int, network: str, database_url: str
) -> tuple[Protected, dict[str, tuple[Rule, ...]]]:
    """For a node's filter: the farm's protected networks and the rules of every desktop placed on the node (or on
    another node of the same machine)."""
    async with db.connect() as conn:
        prot = await protected(conn, network, database_url)
        rows = (
            await conn.execute(
                sa.select(d.c.ip, d.c.tenant_id, d.c.osf_id).where(
                    d.c.node_id.in_(_nodes_sharing_the_machine(node_id)), d.c.state != DesktopState.STOPPED.value
                )
            )
        ).all()
        policies: dict[tuple[int, int], tuple[Rule, ...]] = {}
        desktops = {}
        for row in rows:
            key = (int(row.tenant_id), int(row.osf_id))
            if key not in policies:
                policies[key] = (await read_desktop_network(conn, *key)).rules
            desktops[str(row.ip)] = policies[key]
    return prot, desktops


def _nodes_sharing_the_machine(node_id: int) -> sa.Select[Any]:
    """This node and the others on its machine (same boot id): several nodes of a demo farm share one bridge, so
    its filter must hold all their desktops (desktop addresses are unique in a farm, and desktops cannot forge
    their source address: they lack CAP_NET_ADMIN and CAP_NET_RAW)."""
    n = t.nodes
    boot = sa.select(n.c.boot_id).where(n.c.id == node_id).scalar_subquery()
    return sa.select(n.c.id).where(sa.or_(n.c.id == node_id, sa.and_(n.c.boot_id != "", n.c.boot_id == boot)))


async def check_policy(conn: AsyncConnection, text: str, network: str, database_url: str) -> None:
    """Refuse a policy that allows a destination that is wholly the farm's (409 ``egress_opens_farm``)."""
    rule = opens_farm(parse_policy(text), await protected(conn, network, database_url))
    if rule is not None:
        raise BadInput(
            f"rule `{rule.text}` would open the farm itself ({rule.net} is the farm's): desktops never reach other "
            "desktops, the nodes or the database; allow the networks outside the farm instead",
            code="egress_opens_farm",
        )


def farm_check(network: str, database_url: str) -> ValueCheck:
    """What ``set_config`` checks a new value with: an egress policy must not open the farm."""

    async def check(conn: AsyncConnection, key: str, value: Any) -> None:
        if key == "network.egress":
            await check_policy(conn, str(value), network, database_url)

    return check


async def explain(
    db: Database,
    actor: Actor,
    desktop: str | int,
    dest: str,
    *,
    port: int | None,
    proto: str,
    network: str,
    database_url: str,
) -> dict[str, Any]:
    """Whether the desktop may connect to ``dest`` (an IPv4 address), which rule decides and where it came from."""
    require(actor, "desktop.see")
    try:
        address = ipaddress.IPv4Address(dest)
    except ValueError:
        raise BadInput(f"{dest!r} is not an IPv4 address", code="bad_destination") from None
    if proto not in (*PROTOS, "any"):
        raise BadInput(f"unknown protocol {proto!r}: use tcp, udp or icmp", code="bad_protocol")
    if port is not None and not (1 <= port <= 65535 and proto in ("tcp", "udp")):
        raise BadInput("a port is 1-65535 and needs tcp or udp", code="bad_port")
    desktop_id = await find_desktop_id(db, actor, desktop)
    async with db.connect() as conn:
        row = (await conn.execute(sa.select(d.c.name, d.c.tenant_id, d.c.osf_id).where(d.c.id == desktop_id))).one()
        net = await read_desktop_network(conn, int(row.tenant_id), int(row.osf_id))
        prot = await protected(conn, network, database_url)
    verdict = decide(net.rules, prot, address, proto, port, source=net.source)
    return {
        "desktop": row.name,
        "destination": str(address),
        "proto": proto,
        "port": port,
        "allowed": verdict.allowed,
        "decided_by": verdict.decided_by,
        "reason": verdict.reason,
        "rule": verdict.rule,
        "rule_index": verdict.index,
        "policy_source": net.source,
        "policy": [r.text for r in net.rules],
    }
