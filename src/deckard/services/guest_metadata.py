"""The facts a desktop's guest learns at boot (``model/guest_metadata.py`` renders them), read from the farm.

The node's metadata service (``node/metadata.py``) asks :func:`metadata_for_ip` with the source address of each
request: the answer is the starting or running desktop with that address on this node (or on another node of the
same machine, which shares the bridge), or None.  The VM driver's NoCloud seed asks :func:`metadata_for_desktop`.

What is read: the desktop's name and addresses, its tenant, its user's login and public SSH keys
(``users.ssh_keys``), the node's name (the availability zone), the DNS search domains (``network.dns.search``)
and the user-data of the desktop's tenant or OSF (``guest.user_data``).  Nothing secret: not the agent's token,
not the user's password hash, not a personal token.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import NotFound
from deckard.model.guest_metadata import GuestMetadata, hostname_for, load_ssh_keys
from deckard.model.network import network_gateway, prefix_len
from deckard.model.states import DesktopState
from deckard.services.config import read_configs
from deckard.services.network_policy import _nodes_sharing_the_machine

d = t.desktops
BOOTING = (DesktopState.STARTING.value, DesktopState.RUNNING.value)


def _query() -> sa.Select[Any]:
    return (
        sa.select(
            d.c.id,
            d.c.name,
            d.c.ip,
            d.c.mac,
            d.c.tenant_id,
            d.c.osf_id,
            t.users.c.login,
            t.users.c.ssh_keys,
            t.tenants.c.name.label("tenant"),
            t.nodes.c.name.label("node"),
            d.c.network_ip,
            t.networks.c.range.label("network_range"),
            t.networks.c.gateway.label("network_gateway"),
        )
        .join(t.users, t.users.c.id == d.c.user_id)
        .join(t.tenants, t.tenants.c.id == d.c.tenant_id)
        .outerjoin(t.nodes, t.nodes.c.id == d.c.node_id)
        .outerjoin(t.networks, t.networks.c.id == d.c.network_id)
    )


async def _metadata(conn: AsyncConnection, row: Any, *, network: str, farm_id: str) -> GuestMetadata:
    tenant_id, osf_id = int(row.tenant_id), int(row.osf_id)
    network_config = await read_configs(conn, "network.dns.", tenant_id, osf_id)
    guest_config = await read_configs(conn, "guest.", tenant_id, osf_id)
    if row.network_ip is not None:  # a tenant network: the guest's own address and gateway there
        network = str(row.network_range)
    gateway = network_gateway(network, row.network_gateway)
    return GuestMetadata(
        desktop_id=int(row.id),
        instance_id=f"deckard-{farm_id}-{row.id}",
        hostname=hostname_for(str(row.name), int(row.id)),
        name=str(row.name),
        tenant=str(row.tenant),
        user=str(row.login),
        ip=str(row.network_ip or row.ip),
        prefix_len=prefix_len(network),
        gateway=gateway,
        mac=str(row.mac),
        availability_zone=str(row.node or ""),
        dns_servers=(gateway,),  # the node's resolver (drivers/dns.py)
        dns_search=tuple(str(network_config["network.dns.search"]).split()),
        public_keys=tuple(load_ssh_keys(row.ssh_keys)),
        user_data=str(guest_config["guest.user_data"]),
    )


async def metadata_for_ip(db: Database, node_id: int, ip: str, *, network: str, farm_id: str) -> GuestMetadata | None:
    """The metadata of the starting or running desktop at ``ip`` on this node's machine; None if there is none
    (a stopped desktop's address, an address that is no desktop's)."""
    q = _query().where(d.c.ip == ip, d.c.state.in_(BOOTING), d.c.node_id.in_(_nodes_sharing_the_machine(node_id)))
    async with db.connect() as conn:
        row = (await conn.execute(q)).first()
        return None if row is None else await _metadata(conn, row, network=network, farm_id=farm_id)


async def metadata_for_desktop(db: Database, desktop_id: int, *, network: str, farm_id: str) -> GuestMetadata:
    """One desktop's metadata, whatever its state (the VM driver writes its NoCloud seed before it boots)."""
    async with db.connect() as conn:
        row = (await conn.execute(_query().where(d.c.id == desktop_id))).first()
        if row is None:
            raise NotFound(f"no desktop with id {desktop_id}", code="desktop_not_found")
        return await _metadata(conn, row, network=network, farm_id=farm_id)
