"""Tenant networks through the real API (SQLite and PostgreSQL): two tenants may use the same range and their
desktops the same address there (each keeping a farm address of its own); ranges of one tenant, and shared ones,
may not overlap; a shared network is usable by the tenants it is granted to and invisible to the others; a network
in use is neither deleted nor revoked; a stopped desktop moves to another network with a new address there; and
the ``deckard network`` commands drive it all."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import test_api
import typer
from test_api import Farm, add_node, call
from test_tenancy_acl import PASSWORD, multitenant, tenant_admin
from typer.testing import CliRunner

from deckard.cli import admin as admin_cli
from deckard.cli import session
from deckard.client.api import ApiClient
from deckard.db.engine import Database
from deckard.model.errors import BadInput, Conflict, NotFound, PermissionDenied
from deckard.services import desktops, networks, users
from deckard.services.context import SYSTEM
from deckard.services.tenancy import bootstrap_farm

farm = test_api.farm  # the real API with TLS, shared with test_api.py
DEFAULT_RANGE = "10.231.0.0/22"  # Settings().network.range, the farm's default network


async def two_tenants(farm: Farm) -> tuple[ApiClient, ApiClient, ApiClient]:
    """The farm's administrator and the administrators of tenants acme and beta, each tenant with one user."""
    root = await farm.admin_client()
    await multitenant(root)
    acme = await tenant_admin(farm, root, "acme", "ann", ["Tenant admin"])
    beta = await tenant_admin(farm, root, "beta", "bob", ["Tenant admin"])
    await call(acme.create_user, "alice", "pw-alice")
    await call(beta.create_user, "bruno", "pw-bruno")
    return root, acme, beta


async def test_two_tenants_use_the_same_range_and_their_desktops_get_the_same_address(farm: Farm) -> None:
    root, acme, beta = await two_tenants(farm)
    net_a = await call(acme.create_network, "lan", "10.50.0.0/24", description="office")
    net_b = await call(beta.create_network, "lan", "10.50.0.0/24")
    assert (net_a.kind, net_a.tenant, net_a.range, net_a.description) == ("private", "acme", "10.50.0.0/24", "office")
    assert net_b.id != net_a.id and net_b.tenant == "beta"
    desk_a = await call(acme.create_desktop, "a-1", "alice", network="lan")
    desk_b = await call(beta.create_desktop, "b-1", "bruno", network="lan")
    assert desk_a.network_ip == desk_b.network_ip == "10.50.0.11"  # the first 10 hosts are the nodes'
    assert (desk_a.network, desk_a.network_id, desk_b.network_id) == ("lan", net_a.id, net_b.id)
    # the farm addresses, by which nodes and brokers reach them, stay apart
    assert (desk_a.ip, desk_b.ip) == ("10.231.0.11", "10.231.0.12")
    # each tenant sees its own network only; the farm's administrator sees both, and finds one by name@tenant
    assert [n.id for n in await call(acme.list_networks)] == [net_a.id]
    with pytest.raises(NotFound) as e:
        await call(acme.get_network, net_b.id)
    assert e.value.code == "network_not_found"
    assert {n.id for n in await call(root.list_networks)} >= {net_a.id, net_b.id}
    assert (await call(root.get_network, "lan@beta")).id == net_b.id
    # a desktop without a network is on the default network, as before networks existed
    plain = await call(acme.create_desktop, "a-2", "alice")
    assert (plain.network, plain.network_id, plain.network_ip, plain.ip) == (None, None, None, "10.231.0.13")
    # lists filter on the network like on any other field
    assert [d.name for d in await call(root.list_desktops, None, {"network": "lan", "sort": "name"})] == ["a-1", "b-1"]
    assert [d.name for d in await call(acme.list_desktops, None, {"network__null": "true"})] == ["a-2"]


async def test_overlapping_ranges_of_one_tenant_are_refused_naming_the_other_network(farm: Farm) -> None:
    root, acme, _beta = await two_tenants(farm)
    await call(acme.create_network, "lan", "10.50.0.0/24")
    with pytest.raises(Conflict) as e:
        await call(acme.create_network, "lab", "10.50.0.128/25")
    assert e.value.code == "network_overlap" and "'lan'" in e.value.message
    with pytest.raises(Conflict) as e:  # the farm's administrator, for the tenant: the same rule
        await call(root.create_network, "wide", "10.50.0.0/16", tenant="acme")
    assert e.value.code == "network_overlap"
    with pytest.raises(Conflict) as e:
        await call(acme.create_network, "lan", "10.51.0.0/24")
    assert e.value.code == "duplicate"
    assert (await call(root.create_network, "wide", "10.50.0.0/16", tenant="beta")).tenant == "beta"
    # a tenant administrator makes networks in its own tenant only, and never a shared one
    with pytest.raises(NotFound):
        await call(acme.create_network, "theirs", "10.52.0.0/24", tenant="beta")
    with pytest.raises(PermissionDenied) as e:
        await call(acme.create_network, "corp", "10.53.0.0/24", shared=True)
    assert e.value.code == "supertenant_only"
    with pytest.raises(Conflict) as e:  # the farm's own range: every desktop has an address there too
        await call(acme.create_network, "farmish", "10.231.0.0/24")
    assert e.value.code == "network_overlap" and "default network" in e.value.message


async def test_shared_networks_overlap_neither_each_other_nor_the_default_network(farm: Farm) -> None:
    root = await farm.admin_client()
    await call(root.create_network, "corp", "10.60.0.0/24", shared=True)
    with pytest.raises(Conflict) as e:
        await call(root.create_network, "corp2", "10.60.0.0/25", shared=True)
    assert e.value.code == "network_overlap" and "corp" in e.value.message
    with pytest.raises(Conflict) as e:
        await call(root.create_network, "under", "10.231.1.0/24", shared=True)
    assert e.value.code == "network_overlap" and "default network" in e.value.message
    with pytest.raises(Conflict) as e:
        await call(root.create_network, "corp", "10.61.0.0/24", shared=True)
    assert e.value.code == "duplicate"
    # a private network may overlap a shared one (another segment), not the default network (every desktop has
    # its farm address there)
    assert (await call(root.create_network, "lan", "10.60.0.0/24")).kind == "private"
    with pytest.raises(Conflict) as e:
        await call(root.create_network, "lan2", DEFAULT_RANGE)
    assert e.value.code == "network_overlap"


async def test_a_shared_network_serves_the_tenants_granted_and_is_invisible_to_others(farm: Farm) -> None:
    root, acme, beta = await two_tenants(farm)
    corp = await call(root.create_network, "corp", "10.60.0.0/24", shared=True)
    assert corp.tenant_id is None and corp.tenants == []
    with pytest.raises(NotFound):  # not granted yet: it does not exist for acme
        await call(acme.create_osf, "web", network="corp")
    granted = await call(root.grant_network, "corp", "acme")
    assert granted.tenants == ["acme"]
    assert (await call(root.grant_network, "corp", "acme")).tenants == ["acme"]  # twice changes nothing
    assert (await call(acme.get_network, "corp")).tenants == ["acme"]
    with pytest.raises(NotFound) as e:
        await call(beta.get_network, "corp")
    assert e.value.code == "network_not_found"
    assert await call(beta.list_networks) == []
    osf = await call(acme.create_osf, "web", network="corp")
    assert (osf.network, osf.network_id) == ("corp", corp.id)
    with pytest.raises(NotFound) as e:
        await call(beta.create_osf, "web", network="corp")
    assert e.value.code == "network_not_found"
    with pytest.raises(NotFound):
        await call(beta.create_desktop, "b-1", "bruno", network=str(corp.id))
    # a desktop of the OSF is on the OSF's network unless it names another
    desk = await call(acme.create_desktop, "a-1", "alice", osf="web")
    assert (desk.network, desk.network_ip) == ("corp", "10.60.0.11")
    assert [o.name for o in await call(root.list_osfs, network="corp")] == ["web"]
    # only the farm's administrators change a shared network or its grants
    with pytest.raises(PermissionDenied):
        await call(acme.delete_network, "corp")
    with pytest.raises(PermissionDenied):
        await call(acme.grant_network, "corp", "acme")
    # changing the OSF's network moves no desktop; "" puts it back on the default network
    assert (await call(acme.update_osf, "web", network="")).network is None
    assert (await call(acme.get_desktop, "a-1")).network == "corp"


async def test_a_network_in_use_is_neither_deleted_nor_revoked(farm: Farm) -> None:
    root, acme, _beta = await two_tenants(farm)
    await call(root.create_network, "corp", "10.60.0.0/24", shared=True)
    await call(root.grant_network, "corp", "acme")
    await call(root.grant_network, "corp", "beta")
    await call(acme.create_osf, "web", network="corp")
    await call(acme.create_desktop, "a-1", "alice", network="corp")
    with pytest.raises(Conflict) as e:
        await call(root.revoke_network, "corp", "acme")
    assert e.value.code == "network_in_use" and "a-1" in e.value.message and "web" in e.value.message
    assert e.value.details["desktops"] == 1 and e.value.details["osfs"] == 1
    with pytest.raises(Conflict) as e:
        await call(root.delete_network, "corp")
    assert e.value.code == "network_in_use"
    await call(root.revoke_network, "corp", "beta")  # beta uses nothing on it
    assert (await call(root.get_network, "corp")).tenants == ["acme"]
    with pytest.raises(NotFound) as e:
        await call(root.revoke_network, "corp", "beta")
    assert e.value.code == "grant_not_found"
    await call(acme.delete_desktop, "a-1")
    await call(acme.update_osf, "web", network="")
    await call(root.revoke_network, "corp", "acme")
    await call(root.delete_network, "corp")
    assert [n.name for n in await call(root.list_networks)] == []
    # a private network likewise, and its tenant's administrator deletes it
    await call(acme.create_network, "lan", "10.50.0.0/24")
    await call(acme.create_desktop, "a-2", "alice", network="lan")
    with pytest.raises(Conflict) as e:
        await call(acme.delete_network, "lan")
    assert e.value.code == "network_in_use"
    await call(acme.delete_desktop, "a-2")
    await call(acme.delete_network, "lan")


async def test_a_stopped_desktop_moves_to_another_network_with_a_new_address_a_running_one_does_not(
    farm: Farm,
) -> None:
    root = await farm.admin_client()
    await call(root.create_user, "carol", "pw-carol")
    await call(root.create_network, "lan", "10.50.0.0/24")
    await call(root.create_desktop, "c-0", "carol", network="lan")  # takes the lan's first address
    desk = await call(root.create_desktop, "c-1", "carol")
    assert (desk.network, desk.network_ip, desk.ip) == (None, None, "10.231.0.12")
    moved = await call(root.update_desktop, "c-1", network="lan")
    assert (moved.network, moved.network_ip) == ("lan", "10.50.0.12")
    assert (moved.ip, moved.mac) == (desk.ip, desk.mac)  # its farm address stays
    back = await call(root.update_desktop, "c-1", network="")
    assert (back.network, back.network_ip, back.ip) == (None, None, "10.231.0.12")
    with pytest.raises(NotFound) as e:
        await call(root.update_desktop, "c-1", network="nowhere")
    assert e.value.code == "network_not_found"
    await add_node(farm.db)
    await call(root.start_desktop, "c-1")
    with pytest.raises(Conflict) as e:
        await call(root.update_desktop, "c-1", network="lan")
    assert e.value.code == "desktop_running"
    still = await call(root.get_desktop, "c-1")
    assert (still.network, still.network_ip) == (None, None)


@pytest.mark.parametrize("bad", ["8.8.8.0/24", "10.0.0.0/8", "10.1.0.0/30", "fd00::/64", "10.1.0.1/24", "lan"])
async def test_a_range_outside_private_space_or_16_to_28_bits_is_bad_network_range(farm: Farm, bad: str) -> None:
    root = await farm.admin_client()
    with pytest.raises(BadInput) as e:
        await call(root.create_network, "lan", bad)
    assert e.value.code == "bad_network_range" and e.value.status == 422
    assert "/16 to /28" in e.value.message


async def test_a_read_only_administrator_sees_networks_and_changes_none(farm: Farm) -> None:
    root = await farm.admin_client()
    await call(root.create_network, "lan", "10.50.0.0/24")
    await call(root.create_admin, "reader", PASSWORD, tenant="default", roles=["Read-only"])
    reader = farm.client()
    await call(reader.login, "reader", PASSWORD, "default")
    assert [n.name for n in await call(reader.list_networks)] == ["lan"]
    with pytest.raises(PermissionDenied) as e:
        await call(reader.create_network, "lab", "10.51.0.0/24")
    assert e.value.code == "forbidden_action"


async def cli(farm: Farm, token: str | None, *args: str) -> tuple[int, str]:
    """``deckard <args>`` against the farm's API with ``token``: exit code and output."""
    original = session.open_client
    session.open_client = lambda _profile: farm.client(token)  # type: ignore[assignment]
    app = typer.Typer()
    admin_cli.register(app)
    try:
        result = await asyncio.to_thread(CliRunner().invoke, app, list(args))
    finally:
        session.open_client = original  # type: ignore[assignment]
    return result.exit_code, result.output


async def test_the_network_commands_create_grant_use_revoke_and_delete(farm: Farm) -> None:
    root, acme, _beta = await two_tenants(farm)
    code, out = await cli(farm, root.token, "network", "create", "corp", "--range", "10.60.0.0/24", "--shared")
    assert code == 0 and "network 'corp'" in out and "10.60.0.0/24" in out, out
    code, out = await cli(farm, root.token, "network", "grant", "corp", "acme")
    assert code == 0 and "granted to acme" in out, out
    code, out = await cli(farm, acme.token, "network", "create", "lan", "--range", "10.50.0.0/24", "-d", "office")
    assert code == 0 and "tenant acme" in out, out
    code, out = await cli(farm, acme.token, "osf", "add", "web", "--network", "corp")
    assert code == 0, out
    code, out = await cli(farm, acme.token, "desktop", "add", "a-1", "--user", "alice", "--osf", "web")
    assert code == 0 and "10.60.0.11 on network 'corp'" in out, out
    code, out = await cli(farm, acme.token, "desktop", "update", "a-1", "--network", "lan")
    assert code == 0 and (await call(acme.get_desktop, "a-1")).network_ip == "10.50.0.11", out
    code, out = await cli(farm, acme.token, "network", "list")
    assert code == 0 and "corp" in out and "lan" in out and "acme" in out, out
    code, out = await cli(farm, acme.token, "osf", "update", "web", "--network", "")
    assert code == 0 and (await call(acme.get_osf, "web")).network is None, out
    code, out = await cli(farm, root.token, "network", "revoke", "corp", "acme")
    assert code == 0 and "revoked from tenant 'acme'" in out, out
    code, out = await cli(farm, acme.token, "network", "delete", "lan")
    assert code == 1 and "network_in_use" in out, out
    code, out = await cli(farm, root.token, "network", "delete", "corp")
    assert code == 0 and "deleted" in out, out


async def test_desktops_made_at_once_on_one_network_get_distinct_addresses(db: Database) -> None:
    """Creators racing for the lowest free address of one network (and of the farm): the unique indexes catch the
    loser, who picks again, so every desktop gets addresses of its own."""
    await bootstrap_farm(db)
    await users.create_user(db, SYSTEM, "alice", "s3cret!")
    await networks.create_network(db, SYSTEM, "lan", range="10.50.0.0/24", default_range=DEFAULT_RANGE)
    made = await asyncio.gather(
        *(
            desktops.create_desktop(db, SYSTEM, f"d{i}", "alice", network=DEFAULT_RANGE, tenant_network="lan")
            for i in range(10)
        )
    )
    assert sorted(d["network_ip"] for d in made) == sorted(f"10.50.0.{i}" for i in range(11, 21))
    assert sorted(d["ip"] for d in made) == sorted(f"10.231.0.{i}" for i in range(11, 21))
    plain = await desktops.create_desktop(db, SYSTEM, "plain", "alice", network=DEFAULT_RANGE)
    assert (plain["ip"], plain["network"], plain["network_ip"]) == ("10.231.0.21", None, None)


async def test_deleting_a_tenant_deletes_its_private_networks(farm: Farm) -> None:
    root = await farm.admin_client()
    await multitenant(root)
    await call(root.create_tenant, "gamma")
    await call(root.create_network, "lan", "10.50.0.0/24", tenant="gamma")
    await call(root.create_network, "corp", "10.60.0.0/24", shared=True)
    await call(root.grant_network, "corp", "gamma")
    await call(root.delete_tenant, "gamma")
    assert [(n.name, n.tenants) for n in await call(root.list_networks)] == [("corp", [])]


async def _network_events_until(lines: Any, name: str) -> list[tuple[str, str]]:
    """The network events of the stream, as (type, name or tenant granted), up to the creation of ``name``."""
    seen: list[tuple[str, str]] = []
    kind = None
    async for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: ") and kind:
            data = json.loads(line[len("data: ") :])
            if data.get("object") == "network":
                seen.append((kind, str(data.get("name") or data.get("granted"))))
                if (kind, data.get("name")) == ("created", name):
                    return seen
    raise AssertionError("the stream ended")


async def test_a_tenant_administrator_hears_of_its_networks_and_grants_only(farm: Farm) -> None:
    root, acme, _beta = await two_tenants(farm)
    async with farm.http() as http, http.stream("GET", "/events", params={"token": acme.token}) as r:
        lines = r.aiter_lines()
        assert await asyncio.wait_for(lines.__anext__(), 10) == ": connected"
        await call(root.create_network, "corp", "10.60.0.0/24", shared=True)  # the farm's: not acme's news
        await call(root.create_network, "wide", "10.50.0.0/16", tenant="beta")  # beta's: not acme's either
        await call(root.grant_network, "corp", "acme")
        await call(acme.create_network, "lan", "10.50.0.0/24")
        heard = await asyncio.wait_for(_network_events_until(lines, "lan"), 10)
    assert heard == [("updated", "acme"), ("created", "lan")]


async def test_a_tenant_desktop_learns_its_own_address_and_the_node_its_farm_address(db: Database) -> None:
    """The guest's metadata (and a VM's seed) has its address and gateway in its network; what the node starts it
    with and its tenant view map the farm address to it (``drivers/tenant_net.py``)."""
    from deckard.services import guest_metadata, network_policy

    await bootstrap_farm(db)
    await users.create_user(db, SYSTEM, "alice", "s3cret!")
    await networks.create_network(db, SYSTEM, "lan", range="10.50.0.0/24", default_range=DEFAULT_RANGE)
    desk = await desktops.create_desktop(db, SYSTEM, "d1", "alice", network=DEFAULT_RANGE, tenant_network="lan")
    plain = await desktops.create_desktop(db, SYSTEM, "d2", "alice", network=DEFAULT_RANGE)
    md = await guest_metadata.metadata_for_desktop(db, desk["id"], network=DEFAULT_RANGE, farm_id="f")
    assert (md.ip, md.prefix_len, md.gateway, md.dns_servers) == ("10.50.0.11", 24, "10.50.0.1", ("10.50.0.1",))
    md = await guest_metadata.metadata_for_desktop(db, plain["id"], network=DEFAULT_RANGE, farm_id="f")
    assert (md.ip, md.prefix_len, md.gateway) == (plain["ip"], 22, "10.231.0.1")
    async with db.connect() as conn:
        ours = await network_policy.tenant_address(conn, desk["id"])
        lan = network_policy.TenantNetworkRow(desk["network_id"], "10.50.0.0/24")
        assert ours == network_policy.TenantAddress(lan, "10.50.0.11")
        assert await network_policy.tenant_address(conn, plain["id"]) is None
    node = await add_node(db)
    await db_place(db, [desk["id"], plain["id"]], node)
    view = await network_policy.tenant_view(db, node)
    assert view == {lan: {desk["ip"]: "10.50.0.11"}}


async def db_place(db: Database, desktop_ids: list[int], node_id: int) -> None:
    """Put desktops on a node as a claim would (what the tenant view reads)."""
    import sqlalchemy as sa

    from deckard.db import schema as t

    async with db.begin() as conn:
        await conn.execute(
            sa.update(t.desktops).where(t.desktops.c.id.in_(desktop_ids)).values(node_id=node_id, state="starting")
        )
