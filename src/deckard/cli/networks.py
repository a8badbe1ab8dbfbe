"""``deckard network ...``: tenant networks (``docs/networking.md``, "Tenant networks"): list, show, create,
update, delete, grant, revoke — the same nouns as the API's ``/networks``.  OSFs and desktops name theirs with
``--network`` (``deckard osf add/update``, ``deckard desktop add/update``)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from deckard.cli import session
from deckard.cli.output import print_done
from deckard.cli.session import JsonOpt, ProfileOpt
from deckard.cli.verbs import list_command, object_command, option
from deckard.client.api import ApiClient
from deckard.model.network import FARM_KINDS
from deckard.model.schemas import Network

app = typer.Typer(
    help="Networks: private segments of a tenant, or shared ones granted to tenants.", no_args_is_help=True
)

COLUMNS = ("id", "name", "kind", "tenant", "range", "tenants", "interface", "vlan", "description")
NetworkArg = Annotated[str, typer.Argument(help="Name or id of the network (name@tenant across tenants).")]
TenantArg = Annotated[str, typer.Argument(help="Name or id of the tenant.")]
RangeOpt = Annotated[str, typer.Option("--range", "-r", help="IPv4 CIDR, /16 to /28, e.g. 10.1.0.0/24.")]
SharedOpt = Annotated[bool, typer.Option("--shared", help="A shared network to grant to tenants (farm only).")]
TenantOpt = Annotated[str | None, typer.Option("--tenant", help="Whose private network (farm's administrators).")]
DescOpt = Annotated[str | None, typer.Option("--description", "-d")]
InterfaceOpt = Annotated[
    str | None, typer.Option("--interface", help="A flat network: the node interface it is on (farm only).")
]
VlanOpt = Annotated[int | None, typer.Option("--vlan", help="A flat network's VLAN tag (default: untagged).")]
GatewayOpt = Annotated[str | None, typer.Option("--gateway", help="A flat network's router (default: first host).")]


def _row(net: Network) -> dict[str, Any]:
    return {**net.dump(), "tenants": ", ".join(net.tenants or [])}


def _done(verb: str) -> Any:
    def message(net: Network) -> str:
        granted = ", ".join(net.tenants or []) or "no tenant yet"
        where = f"{net.kind}, granted to {granted}" if net.kind in FARM_KINDS else f"tenant {net.tenant}"
        return f"network {net.name!r} (id {net.id}, {net.range}, {where}) {verb}"

    return message


def _create(
    api: ApiClient,
    ref: str,
    range: str,
    shared: bool,
    tenant: str | None,
    description: str | None,
    interface: str | None,
    vlan: int | None,
    gateway: str | None,
) -> Network:
    return api.create_network(
        ref,
        range,
        shared=shared,
        tenant=tenant,
        description=description or "",
        interface=interface,
        vlan=vlan,
        gateway=gateway,
    )


create = object_command(
    Annotated[str, typer.Argument(help="Name of the new network.")],
    _create,
    "Create a network: private to a tenant, --shared, or flat on a node --interface (grant those to tenants).",
    _done("created"),
    [
        option("range", RangeOpt, ...),
        option("shared", SharedOpt, False),
        option("tenant", TenantOpt),
        option("description", DescOpt),
        option("interface", InterfaceOpt),
        option("vlan", VlanOpt),
        option("gateway", GatewayOpt),
    ],
)

app.command("list")(list_command("networks", Network, COLUMNS, "List networks.", table_row=_row))
app.command("show")(object_command(NetworkArg, lambda api, ref: api.get_network(ref), "Show one network."))
app.command("create")(create)
app.command("add", hidden=True)(create)  # the verb other nouns use
app.command("update")(
    object_command(
        NetworkArg,
        lambda api, ref, description: api.update_network(ref, description=description),
        "Describe a network (its range stays: desktops have addresses in it).",
        _done("updated"),
        [option("description", DescOpt)],
    )
)
app.command("delete")(
    object_command(
        NetworkArg,
        lambda api, ref: api.delete_network(ref),
        "Delete a network (refused while OSFs or desktops are on it).",
        "network {ref!r} deleted",
    )
)
app.command("grant")(
    object_command(
        NetworkArg,
        lambda api, ref, tenant: api.grant_network(ref, tenant),
        "Let a tenant's OSFs and desktops use a shared network.",
        _done("granted"),
        [option("tenant", TenantArg, ...)],
    )
)


@app.command("revoke")
def revoke(network: NetworkArg, tenant: TenantArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Take a shared network back from a tenant (refused while its OSFs or desktops are on it)."""
    with session.api(profile) as api:
        api.revoke_network(network, tenant)
        net = api.get_network(network)
    print_done(f"network {net.name!r} revoked from tenant {tenant!r}", net, as_json=as_json)
