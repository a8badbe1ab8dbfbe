"""Desktops (QVD's VMs, ``/desktops``).  ``{desktop}`` in a path is the numeric id or the name.

Start and stop write a *command* (desired state) and return at once; the owning node acts on it and the
desktop's ``state`` follows (ARCHITECTURE.md §2).  Every action also exists in bulk
(``POST /desktops/bulk/{action}``), answering per item.  Lists take the query syntax of
``services/listing.py`` (``?osf=web&state__in=running,starting&sort=-created_at&page=2&fields=id,name``).

Fields an administrator may not see (``desktop.see.<field>`` ACLs) are absent from answers, so every field but
``id`` is optional in the schema; ``fields=`` selects fields the same way.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import Field

from deckard.api.deps import ActorDep, DbDep, SettingsDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes, list_query
from deckard.api.strict import Id, Ref, RequestModel
from deckard.model.schemas import BulkResult, ConsoleLog, Desktop, NetworkDecision, Page
from deckard.services import bulk, console, desktops, network_policy, session_policy, users
from deckard.services.listing import ListQuery, parse_list_query

router = APIRouter(prefix="/desktops", tags=["desktops"], responses=ERROR_RESPONSES)


class DesktopCreate(RequestModel):
    name: str = Field(min_length=1, max_length=64)
    user: Ref = Field(description="Owner: user id or login.")
    osf: Ref | None = Field(default=None, description="OSF id or name; the default OSF if omitted.")
    tag: str = Field(default="default", min_length=1, max_length=64)
    description: str = Field(default="", max_length=4096)
    network: Ref | Literal[""] | None = Field(
        default=None, description="Network (id or name); the OSF's if omitted, \"\" for the farm's default network."
    )


class DesktopUpdate(RequestModel):
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = Field(default=None, max_length=4096)
    tag: str | None = Field(default=None, min_length=1, max_length=64, description="Only while stopped.")
    osf: Ref | None = Field(default=None, description="Only while stopped.")
    network: Ref | Literal[""] | None = Field(
        default=None,
        description='Only while stopped: move to this network (id or name; "" the farm\'s default) with a new address.',
    )


MAX_EXPIRY_S = 10 * 365 * 86400


class DesktopExpiry(RequestModel):
    soft_s: int | None = Field(
        default=None,
        ge=0,
        le=MAX_EXPIRY_S,
        description="Seconds until the user is told to save their work; null: none.",
    )
    hard_s: int | None = Field(
        default=None, ge=0, le=MAX_EXPIRY_S, description="Seconds until the desktop is stopped; null: none."
    )


DesktopAction = Literal["start", "stop", "block", "unblock", "disconnect", "reset", "delete"]


class BulkRequest(RequestModel):
    ids: list[Id] | None = Field(default=None, max_length=100_000, description="Act on these ids …")
    filter: dict[str, str | int | float | bool] | None = Field(
        max_length=64, default=None, description='… or on every object matching a list filter, e.g. `{"osf": "web"}`.'
    )


def bulk_query(body: BulkRequest, allowed: list[str]) -> ListQuery | None:
    if body.filter is None:
        return None
    pairs = [(k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in body.filter.items()]
    return parse_list_query(pairs, allowed)


def desktop_bulk_query(body: BulkRequest) -> ListQuery | None:
    """``bulk_query`` that also takes the list's relative filters (``{"disconnected_for": "2h"}``)."""
    if body.filter is None:
        return None
    since = {k: v for k, v in body.filter.items() if k in session_policy.SINCE_FILTERS}
    rest = body.model_copy(update={"filter": {k: v for k, v in body.filter.items() if k not in since}})
    q = bulk_query(rest, [*desktops.FIELDS])
    return None if q is None else session_policy.with_since(q, since)


desktop = ObjectRoutes(
    router, "desktop", Desktop, find=lambda s, ref: desktops.find_desktop_id(s.db, s.actor, ref), exclude_unset=True
)


SINCE_HELP = "a number of seconds, or with a unit: 90s, 30m, 2h, 1d"


@router.get("", response_model=Page[Desktop], response_model_exclude_unset=True, summary="List desktops")
async def list_desktops(
    actor: ActorDep,
    db: DbDep,
    q: Annotated[ListQuery, list_query([*desktops.FIELDS], own=session_policy.SINCE_FILTERS)],
    user: Annotated[Ref | None, Query(description="Only this user's desktops (id or login).")] = None,
    disconnected_for: Annotated[
        str | None,
        Query(
            max_length=16,
            description=f"Only running desktops nobody has been connected to for this long: {SINCE_HELP}.",
        ),
    ] = None,
    idle_for: Annotated[
        str | None,
        Query(
            max_length=16,
            description="Only desktops whose connected user has not typed nor moved the mouse for this long: "
            f"{SINCE_HELP}.",
        ),
    ] = None,
) -> Page[Desktop]:
    q = session_policy.with_since(q, {"disconnected_for": disconnected_for, "idle_for": idle_for})
    user_id = await users.find_user_id(db, actor, user) if user is not None else None
    rows, total = await desktops.list_desktops(db, actor, q, user_id=user_id)
    return Page[Desktop](items=[Desktop.model_validate(r) for r in rows], total=total)


desktop.add_create(
    DesktopCreate,
    lambda s, body: desktops.create_desktop(
        s.db,
        s.actor,
        body.name,
        body.user,
        network=s.settings.network.range,
        tenant_network=body.network,
        **body.model_dump(include={"osf", "tag", "description"}),
    ),
    "Create a desktop (its IP address is allocated here)",
)


@router.post(
    "/bulk/{action}",
    response_model=BulkResult,
    summary="Act on many desktops: start, stop, block, unblock, disconnect, reset, delete",
)
async def bulk_action(
    action: DesktopAction, body: BulkRequest, actor: ActorDep, db: DbDep, settings: SettingsDep
) -> BulkResult:
    q = desktop_bulk_query(body)
    out = await bulk.bulk_desktops(db, actor, action, ids=body.ids, q=q, paths=settings.paths)
    return BulkResult.model_validate(out)


desktop.add_get(lambda s, i: desktops.get_desktop(s.db, s.actor, i), "Show a desktop")
desktop.add_patch(
    DesktopUpdate,
    lambda s, i, body: desktops.update_desktop(
        s.db,
        s.actor,
        i,
        tenant_network=body.network,
        **body.model_dump(exclude_unset=True, exclude={"network"}),
    ),
    "Rename, describe, retag, or change the OSF or network (the last three only while stopped: 409 desktop_running)",
)
desktop.add_delete(
    lambda s, i: desktops.delete_desktop(s.db, s.actor, i, s.settings.paths),
    "Delete a stopped desktop and its writable layer; the user's home stays (409 desktop_running while it runs)",
)
desktop.add_action(
    "start",
    lambda s, i: desktops.start_desktop(s.db, s.actor, i),
    "Ask a node to start the desktop (503 no_node when no node can take it)",
)
desktop.add_action("stop", lambda s, i: desktops.stop_desktop(s.db, s.actor, i), "Ask the desktop's node to stop it")
desktop.add_action(
    "block", lambda s, i: desktops.set_blocked(s.db, s.actor, i, True), "Block the desktop: nobody may start it"
)
desktop.add_action("unblock", lambda s, i: desktops.set_blocked(s.db, s.actor, i, False), "Unblock the desktop")
desktop.add_action(
    "disconnect",
    lambda s, i: desktops.disconnect_desktop(s.db, s.actor, i),
    "Disconnect the user: their display connection closes, the desktop keeps running",
)
desktop.add_action(
    "reset",
    lambda s, i: desktops.reset_desktop(s.db, s.actor, i, s.settings.paths),
    "Discard the desktop's overlay so its next start is a clean image (stopped desktops only)",
)
desktop.add_action_with(
    "expire",
    DesktopExpiry,
    lambda s, i, body: desktops.set_expiry(s.db, s.actor, i, soft_s=body.soft_s, hard_s=body.hard_s),
    "Set the desktop's soft and hard expiry deadlines, or clear them (the owning node warns, then stops it)",
)


@router.get(
    "/{desktop}/console",
    response_model=ConsoleLog,
    summary="The end of the desktop's console log (its guest's init, kernel and agent messages)",
)
async def console_log(
    desktop: Ref,
    actor: ActorDep,
    db: DbDep,
    settings: SettingsDep,
    max_bytes: Annotated[int, Query(alias="bytes", ge=1, le=console.MAX_BYTES)] = 65536,
) -> ConsoleLog:
    out = await console.console_log(db, actor, desktop, paths=settings.paths, max_bytes=max_bytes)
    return ConsoleLog.model_validate(out)


@router.get(
    "/{desktop}/network/explain",
    response_model=NetworkDecision,
    summary="Whether the desktop may connect to an address, and which rule of its egress policy decides",
)
async def explain_network(
    desktop: Ref,
    actor: ActorDep,
    db: DbDep,
    settings: SettingsDep,
    dest: Annotated[str, Query(max_length=64, description="An IPv4 address.")],
    port: Annotated[int | None, Query(ge=1, le=65535, description="A TCP or UDP port.")] = None,
    proto: Annotated[Literal["tcp", "udp", "icmp"], Query()] = "tcp",
) -> NetworkDecision:
    out = await network_policy.explain(
        db,
        actor,
        desktop,
        dest,
        port=port,
        proto=proto,
        network=settings.network.range,
        database_url=settings.db_url,
    )
    return NetworkDecision.model_validate(out)
