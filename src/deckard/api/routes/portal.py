"""The user portal's API (``/portal``) and the administrators' spy ticket (``/api/v1/desktops/{id}/spy-ticket``).

Users are not administrators: they log in with the password the broker checks (``user`` or ``user@tenant``)
and get a portal token that reaches only their own desktops.  To open a desktop the page asks for a one-time
ticket and hands it to the broker's WebSocket (``broker/websocket.py``): the browser never sends the password
to the broker, and the ticket is useless 30 seconds later or once used.

Where the broker is: the ``broker_url`` a running node registered (the desktop's own node first); when it names
a loopback or wildcard address (an all-in-one farm) the request's host is used instead, so a browser on another
machine gets an address it can reach.  The queries and the checks that a desktop is the user's own are
``services/portal.py``; this module speaks HTTP and turns broker URLs into origins for the request's host.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Annotated, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Path, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from deckard.api.deps import ActorDep, DbDep, SettingsDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.strict import RequestModel
from deckard.model.entities import User
from deckard.model.errors import Unauthenticated
from deckard.model.ids import ID_MAX
from deckard.runtime.settings import Settings
from deckard.services import identity, portal, tickets

router = APIRouter(tags=["portal"], responses=ERROR_RESPONSES)
# the /portal routes are the users' API, not the administrators': they stay out of the admin OpenAPI document
# (whose contract tests assume admin tokens and tenant-scoped objects); docs/portal.md describes them
users_router = APIRouter(prefix="/portal", tags=["portal"], include_in_schema=False)
_bearer = HTTPBearer(auto_error=False, description="A portal token from POST /portal/login.")


async def get_user(
    request: Request, db: DbDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> User:
    if credentials is None or not credentials.credentials:
        raise Unauthenticated("log in to the portal first (POST /portal/login)", code="no_credentials")
    user = await tickets.user_for_token(db, credentials.credentials)
    request.state.admin = f"user:{user.login}"  # for the request's log line
    return user


UserDep = Annotated[User, Depends(get_user)]
DesktopId = Annotated[int, Path(ge=1, le=ID_MAX, description="The desktop's id.")]


class PortalLogin(RequestModel):
    login: str = Field(min_length=1, max_length=130, description="`user` or `user@tenant`.")
    password: str = Field(min_length=1, max_length=1024)
    code: str | None = Field(default=None, max_length=32, description="A second-factor code, if one is due.")


class SecondStep(RequestModel):
    challenge: str = Field(min_length=1, max_length=128, description="`details.challenge` of the first step.")
    code: str = Field(min_length=1, max_length=32, description="The authenticator app's code, or a recovery code.")


class PortalSession(BaseModel):
    token: str = Field(description="Send as 'Authorization: Bearer <token>' to /portal/*.")
    login: str
    expires_at: dt.datetime


class PortalDesktop(BaseModel):
    id: int
    name: str
    state: str
    cmd: str | None
    blocked: bool
    user_state: str
    failure_reason: str | None = None
    features: dict[str, bool] = Field(
        default_factory=dict,
        description="What the browser desktop offers besides the picture: `files`, `printing`, `sound`.",
    )


class TicketRequest(RequestModel):
    purpose: Literal["connect", "files", "sound"] = Field(
        default="connect",
        description="`connect`: the desktop's display; `files`: its file panel (/ws/files); `sound`: its sound "
        "(/ws/sound).",
    )


class ConnectTicket(BaseModel):
    ticket: str = Field(description="One-time secret, valid 30 s: put it in the broker WebSocket URL.")
    broker_ws_url: str = Field(description="Open this URL (with the ticket already in it) as a WebSocket.")
    expires_at: dt.datetime


class SpyTicketRequest(RequestModel):
    interactive: bool = Field(default=False, description="Allow keyboard and mouse (ACL desktop.spy.interactive).")


def _is_local(host: str) -> bool:
    if host in ("", "localhost", "0.0.0.0", "::"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _broker_origin(url: str | None, req_host: str, default_port: int) -> str:
    """``wss://host:port`` for a node's registered ``broker_url`` (see the module docstring)."""
    if url:
        parts = urlsplit(url if "//" in url else f"https://{url}")
        host = parts.hostname or req_host
        port = parts.port or default_port
        if _is_local(host):
            host = req_host
    else:
        host, port = req_host, default_port
    if ":" in host:
        host = f"[{host}]"
    return f"wss://{host}:{port}"


async def broker_ws_base(db: DbDep, settings: Settings, request: Request, desktop_id: int) -> str:
    """``wss://host:port`` of a broker the browser can reach (see the module docstring)."""
    url = await portal.broker_url_for(db, desktop_id)
    return _broker_origin(url, request.url.hostname or "127.0.0.1", settings.broker.port)


class BrokerOrigins:
    """Every broker origin a page of this farm may open a WebSocket to, for its Content-Security-Policy."""

    def __init__(self, db: DbDep, settings: Settings, ttl: float = 10.0) -> None:
        self.brokers = portal.RunningBrokers(db, ttl)
        self.port = settings.broker.port

    async def __call__(self, req_host: str) -> list[str]:
        origins = {_broker_origin(u, req_host, self.port) for u in await self.brokers()}
        origins.add(_broker_origin(None, req_host, self.port))  # where broker_ws_base points without nodes
        return sorted(origins)


def client_host(request: Request) -> str:
    return request.client.host if request.client else ""


async def open_session(db: DbDep, user: User) -> PortalSession:
    token, expires = await tickets.open_portal_session(db, user)
    return PortalSession(token=token, login=user.login, expires_at=expires)


@users_router.post("/login", response_model=PortalSession, summary="Log a user in to the portal")
async def portal_login(body: PortalLogin, request: Request, db: DbDep, settings: SettingsDep) -> PortalSession:
    """The tenant's login chain (``services/identity.py``).  When a second factor is due the answer is 401
    ``totp_required`` (or ``totp_enrolment_required``) with ``details.challenge`` for the second step."""
    result = await identity.login_password(
        db,
        body.login,
        body.password,
        source=client_host(request),
        via="portal",
        factors={"totp": body.code} if body.code else None,
        network=settings.network.range,
    )
    return await open_session(db, result.user)


@users_router.post("/login/second-factor", response_model=PortalSession, summary="The second step of a login")
async def portal_login_second_factor(body: SecondStep, request: Request, db: DbDep) -> PortalSession:
    result = await identity.login_challenge(db, body.challenge, body.code, source=client_host(request))
    return await open_session(db, result.user)


@users_router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Log out",
)
async def portal_logout(
    db: DbDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Response:
    if credentials is not None and credentials.credentials:
        await tickets.logout_user(db, credentials.credentials)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@users_router.get(
    "/desktops",
    response_model=list[PortalDesktop],
    summary="The user's desktops and their states",
)
async def portal_desktops(user: UserDep, db: DbDep) -> list[PortalDesktop]:
    return [PortalDesktop.model_validate(r) for r in await portal.list_own_desktops(db, user)]


@users_router.post(
    "/desktops/{desktop_id}/ticket",
    response_model=ConnectTicket,
    summary="A one-time ticket for the desktop's display (or, with `purpose`, its file panel or its sound)",
)
async def portal_ticket(
    desktop_id: DesktopId,
    user: UserDep,
    db: DbDep,
    settings: SettingsDep,
    request: Request,
    body: TicketRequest | None = None,
) -> ConnectTicket:
    limits = tickets.TicketLimits.from_settings(settings.broker)
    if body is not None and body.purpose == "files":
        ticket, expires = await tickets.issue_files_ticket(db, user, desktop_id, limits=limits)
        path = "/ws/files"
    elif body is not None and body.purpose == "sound":
        ticket, expires = await tickets.issue_sound_ticket(db, user, desktop_id, limits=limits)
        path = "/ws/sound"
    else:
        ticket, expires = await tickets.issue_connect_ticket(db, user, desktop_id, limits=limits)
        path = "/ws/connect"
    base = await broker_ws_base(db, settings, request, desktop_id)
    return ConnectTicket(
        ticket=ticket, broker_ws_url=f"{base}{path}?id={desktop_id}&ticket={ticket}", expires_at=expires
    )


@users_router.post("/desktops/{desktop_id}/stop", response_model=PortalDesktop, summary="Stop my desktop")
async def portal_stop(desktop_id: DesktopId, user: UserDep, db: DbDep) -> PortalDesktop:
    return PortalDesktop.model_validate(await portal.stop_own_desktop(db, user, desktop_id))


@users_router.post(
    "/desktops/{desktop_id}/reset",
    response_model=PortalDesktop,
    summary="Reset my desktop to a clean image (stopped desktops only)",
)
async def portal_reset(desktop_id: DesktopId, user: UserDep, db: DbDep, settings: SettingsDep) -> PortalDesktop:
    return PortalDesktop.model_validate(await portal.reset_own_desktop(db, user, desktop_id, settings.paths))


router.include_router(users_router)


@router.post(
    "/api/v1/desktops/{desktop_id}/spy-ticket",
    response_model=ConnectTicket,
    tags=["desktops"],
    summary="A one-time ticket to watch a running desktop (ACL desktop.spy; interactive: desktop.spy.interactive)",
)
async def spy_ticket(
    desktop_id: DesktopId,
    actor: ActorDep,
    db: DbDep,
    settings: SettingsDep,
    request: Request,
    body: SpyTicketRequest | None = None,
) -> ConnectTicket:
    interactive = body.interactive if body else False
    limits = tickets.TicketLimits.from_settings(settings.broker)
    ticket, expires = await tickets.issue_spy_ticket(db, actor, desktop_id, interactive=interactive, limits=limits)
    base = await broker_ws_base(db, settings, request, desktop_id)
    return ConnectTicket(ticket=ticket, broker_ws_url=f"{base}/ws/connect?ticket={ticket}", expires_at=expires)
