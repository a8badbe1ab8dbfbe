"""Tenant networks (``/networks``): the segments desktops live on besides the farm's default network.
``{network}`` in a path is the numeric id, the name, or ``name@tenant``.  The rules and error codes live in
``services/networks.py`` and are listed in ``docs/networking.md``."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Response, status
from pydantic import Field

from deckard.api.deps import ScopeDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes
from deckard.api.strict import Ref, RequestModel
from deckard.model.schemas import Network
from deckard.services import networks

router = APIRouter(prefix="/networks", tags=["networks"], responses=ERROR_RESPONSES)


class NetworkCreate(RequestModel):
    name: str = Field(min_length=1, max_length=64)
    range: str = Field(min_length=1, max_length=64, description="IPv4 CIDR, /16 to /28, in private address space.")
    kind: Literal["private", "shared", "flat"] = Field(
        default="private", description="shared and flat: farm's administrators only."
    )
    tenant: Ref | None = Field(default=None, description="Private networks, farm's administrators only: whose.")
    description: str = Field(default="", max_length=4096)
    interface: str | None = Field(default=None, max_length=15, description="Flat: the node interface it is on.")
    vlan: int | None = Field(default=None, ge=1, le=4094, description="Flat: the VLAN tag (none: untagged).")
    gateway: str | None = Field(default=None, max_length=15, description="Flat: its router (default: first host).")


class NetworkUpdate(RequestModel):
    description: str | None = Field(default=None, max_length=4096)


class GrantRequest(RequestModel):
    tenant: Ref = Field(description="The tenant (id or name) whose OSFs and desktops may use the shared network.")


network = ObjectRoutes(router, "network", Network, exclude_unset=True)
network.add_list(lambda s, q: networks.list_networks(s.db, s.actor, q), networks.COLUMNS, "List networks")
network.add_create(
    NetworkCreate,
    lambda s, body: networks.create_network(
        s.db,
        s.actor,
        body.name,
        range=body.range,
        kind=body.kind,
        tenant=body.tenant,
        description=body.description,
        default_range=s.settings.network.range,
        interface=body.interface,
        vlan=body.vlan,
        gateway=body.gateway,
    ),
    "Create a network (422 bad_network_range or bad_flat_network, 409 network_overlap)",
)
network.add_get(lambda s, ref: networks.get_network(s.db, s.actor, ref), "Show a network")
network.add_patch(
    NetworkUpdate,
    lambda s, ref, body: networks.update_network(s.db, s.actor, ref, body.model_dump(exclude_unset=True)),
    "Describe a network (its range stays)",
)
network.add_delete(
    lambda s, ref: networks.delete_network(s.db, s.actor, ref),
    "Delete a network (409 network_in_use while OSFs or desktops are on it)",
)


@router.post(
    "/{network}/grants",
    response_model=Network,
    response_model_exclude_unset=True,
    summary="Let a tenant use a shared network (farm's administrators only)",
)
async def grant_network(network: Ref, body: GrantRequest, scope: ScopeDep) -> Network:
    return Network.model_validate(await networks.grant_network(scope.db, scope.actor, network, body.tenant))


@router.delete(
    "/{network}/grants/{tenant}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Take a shared network back from a tenant (409 network_in_use while its OSFs or desktops are on it)",
)
async def revoke_network(network: Ref, tenant: Ref, scope: ScopeDep) -> Response:
    await networks.revoke_network(scope.db, scope.actor, network, tenant)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
