"""OSFs (QVD's operating system flavours, ``/osfs``): memory, CPUs, driver and overlay policy of desktops.
``{osf}`` in a path is the numeric id or the name.  The rules live in ``services/osfs.py``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import Field

from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes
from deckard.api.strict import Ref, RequestModel
from deckard.model.schemas import Osf
from deckard.services import osfs

router = APIRouter(prefix="/osfs", tags=["osfs"], responses=ERROR_RESPONSES)

NetworkRef = Annotated[
    Ref | Literal[""] | None,
    Field(description='Network (id or name) its new desktops are on; null or "": the farm\'s default network.'),
]


class OsfCreate(RequestModel):
    name: str = Field(min_length=1, max_length=64)
    memory_mib: int = Field(default=1024, ge=64, le=1 << 20)
    cpus: float = Field(default=1.0, ge=0.1, le=256)
    keep_overlay: bool = False
    driver: str = Field(default="container", max_length=16)
    description: str = Field(default="", max_length=4096)
    tenant: Ref | None = Field(default=None, description="Supertenant only: where to create it.")
    network: NetworkRef = None


class OsfUpdate(RequestModel):
    name: str | None = Field(default=None, min_length=1, max_length=64)
    memory_mib: int | None = Field(default=None, ge=64, le=1 << 20)
    cpus: float | None = Field(default=None, ge=0.1, le=256)
    keep_overlay: bool | None = None
    driver: str | None = Field(default=None, max_length=16)
    description: str | None = Field(default=None, max_length=4096)
    network: NetworkRef = None


osf = ObjectRoutes(router, "osf", Osf, exclude_unset=True)
osf.add_list(lambda s, q: osfs.list_osfs(s.db, s.actor, q), osfs.COLUMNS, "List OSFs")


osf.add_create(
    OsfCreate,
    lambda s, body: osfs.create_osf(
        s.db, s.actor, body.name, tenant=body.tenant, **body.model_dump(exclude={"name", "tenant"})
    ),
    "Create an OSF",
)
osf.add_get(lambda s, ref: osfs.get_osf(s.db, s.actor, ref), "Show an OSF")
osf.add_patch(
    OsfUpdate,
    lambda s, ref, body: osfs.update_osf(s.db, s.actor, ref, body.model_dump(exclude_unset=True)),
    "Change an OSF (running desktops keep their old values)",
)
osf.add_delete(
    lambda s, ref: osfs.delete_osf(s.db, s.actor, ref),
    "Delete an OSF (409 has_dependents while desktops or images use it)",
)
