"""Warm pools (``/pools``): per OSF and image tag, how many desktops the farm keeps started for users to take over
(``docs/pools.md``).  ``{pool}`` in a path is the numeric id.  The rules and error codes live in
``services/pools.py``."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import Field

from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes
from deckard.api.strict import Ref, RequestModel
from deckard.model.schemas import Pool
from deckard.model.warm_pool import MAX_POOL_SIZE
from deckard.services import pools

router = APIRouter(prefix="/pools", tags=["pools"], responses=ERROR_RESPONSES)

HOURS = "Login rules' windows (`Mon-Fri 07:00-19:00, Sat 09:00-13:00`): the pool is kept only then; empty: always."


class PoolCreate(RequestModel):
    osf: Ref = Field(description="The OSF (id or name) whose desktops take the pool's guests over.")
    tag: str = Field(default="default", min_length=1, max_length=64, description="The image tag of its guests.")
    size: int = Field(ge=0, le=MAX_POOL_SIZE, description="How many warm guests the farm keeps ready.")
    hours: str = Field(default="", max_length=400, description=HOURS)
    timezone: str = Field(default="UTC", min_length=1, max_length=64, description="The hours' time zone (IANA).")


class PoolUpdate(RequestModel):
    size: int | None = Field(default=None, ge=0, le=MAX_POOL_SIZE)
    hours: str | None = Field(default=None, max_length=400, description=HOURS)
    timezone: str | None = Field(default=None, min_length=1, max_length=64)


pool = ObjectRoutes(router, "pool", Pool, exclude_unset=True)
pool.add_list(lambda s, q: pools.list_pools(s.db, s.actor, q), pools.COLUMNS, "List warm pools")
pool.add_create(
    PoolCreate,
    lambda s, body: pools.create_pool(
        s.db, s.actor, body.osf, tag=body.tag, size=body.size, hours=body.hours, timezone=body.timezone
    ),
    "Create a warm pool (409 pool_unsupported for OSFs whose desktops cannot be warm, pool_limit, duplicate)",
)
pool.add_get(lambda s, ref: pools.get_pool(s.db, s.actor, ref), "Show a warm pool")
pool.add_patch(
    PoolUpdate,
    lambda s, ref, body: pools.update_pool(s.db, s.actor, ref, body.model_dump(exclude_unset=True)),
    "Change a warm pool's size or hours",
)
pool.add_delete(lambda s, ref: pools.delete_pool(s.db, s.actor, ref), "Delete a warm pool (its guests are stopped)")
