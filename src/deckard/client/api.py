"""A typed, synchronous client of the admin API, used by the CLI, tests and benchmarks.

It speaks only HTTPS and trusts only the farm's CA (``ca``), never the environment's proxies or an
"accept any certificate" switch.  An error envelope from the server comes back as the same exception class
the server raised (``deckard.model.errors``), with its ``code``, ``message`` and ``details`` kept, so callers
handle a remote error exactly like a local one; an answer comes back as the API's own schema
(``deckard.model.schemas``: ``client.get_desktop("web-1").state``)::

    DeckardError (code "error")      any other status
     ├── BadInput                    400, 422
     ├── Unauthenticated             401
     ├── PermissionDenied            403
     ├── NotFound                    404
     ├── Conflict                    409
     └── Unavailable                 502-504, and "api_unreachable" when no answer came at all
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from deckard.model.errors import (
    BadInput,
    Conflict,
    DeckardError,
    Unavailable,
    error_class_for_status,
)
from deckard.model.schemas import (
    Acl,
    Admin,
    AdminToken,
    AuditRecord,
    AuditVerification,
    BulkResult,
    ConfigEntry,
    ConsoleLog,
    Desktop,
    Explanation,
    Health,
    Image,
    LoginBan,
    LoginResult,
    Network,
    NetworkDecision,
    Node,
    NodeMaintenance,
    Osf,
    Page,
    Placement,
    Pool,
    Role,
    Schema,
    Stats,
    Tenant,
    TimeToDesktop,
    TokenCreated,
    User,
    UserSecondFactor,
    UserToken,
    Volume,
    VolumeSnapshot,
    WhoAmI,
)
from deckard.model.states import ImageState
from deckard.runtime.tls import new_client_context

API_PREFIX = "/api/v1"
NODE_WAIT_TIMEOUT = 90.0  # attach/detach wait up to a minute for the desktop's node (services/volumes.py)
PER_REQUEST = 1000  # rows fetched a request when a list is read whole (the API's largest page)

M = TypeVar("M", bound=Schema)
Params = dict[str, Any] | list[tuple[str, str]] | None


def error_from_response(response: httpx.Response) -> DeckardError:
    """Rebuild the server's exception from its error envelope (or describe a response that has none)."""
    cls = error_class_for_status(response.status_code)
    try:
        body = response.json()["error"]
        code, message, details = str(body["code"]), str(body["message"]), body.get("details")
    except (ValueError, KeyError, TypeError):
        code, details = "http_error", None
        message = f"the API answered HTTP {response.status_code} without an error body"
    err = cls(message, code=code, details=details if isinstance(details, dict) else None)
    err.status = response.status_code
    return err


def _build_body(profile: str | None, add_packages: list[str] | None, image_format: str | None = None) -> dict[str, Any]:
    """An image build's profile, extra packages and format; the API picks its defaults for what is not named."""
    return {
        "add_packages": add_packages or [],
        **({"profile": profile} if profile else {}),
        **({"format": image_format} if image_format else {}),
    }


def _seg(ref: str | int) -> str:
    # names are restricted by the server, but a path segment must never smuggle '/' or '?'
    return quote(str(ref), safe="")


def _pairs(params: Params) -> list[tuple[str, str]]:
    if isinstance(params, dict):
        return [(k, str(v)) for k, v in params.items() if v is not None]
    return list(params or [])


def _given(**fields: Any) -> dict[str, Any]:
    """The fields the caller set: a PATCH changes only what it names."""
    return {k: v for k, v in fields.items() if v is not None}


class ApiClient:
    """One connection pool to one farm's API; use as a context manager or call ``close()``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        ca: Path | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        verify: ssl.SSLContext | bool = True  # None: the system's trust store
        if ca is not None:
            verify = new_client_context(ca)
            # a pinned server certificate (``deckard login``) is a trust anchor of its own, not only a CA
            verify.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        if transport is None:
            # without TCP_NODELAY a small request body waits for the delayed ACK of its headers: +40 ms a call
            transport = httpx.HTTPTransport(verify=verify, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._http = httpx.Client(
            base_url=self.url + API_PREFIX,
            verify=verify,
            trust_env=False,
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # the one way a request is made: token, transport failure and error envelope handled alike for every call
    def _send(self, method: str, path: str, *, auth: bool = True, **request: Any) -> httpx.Response:
        headers = dict(request.pop("headers", None) or {})
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            response = self._http.request(method, path, headers=headers, **request)
        except httpx.TransportError as e:
            raise Unavailable(
                f"cannot reach the Deckard API at {self.url}: {e or type(e).__name__} "
                "(is the farm running? `deckard up` starts it)",
                code="api_unreachable",
            ) from e
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def _get(self, schema: type[M], method: str, path: str, **request: Any) -> M:
        """A request answered by one object of ``schema``."""
        return schema.model_validate(self._send(method, path, **request).json())

    def _act(self, schema: type[M], resource: str, ref: str | int, action: str) -> M:
        """``POST /<resource>/<ref>/<action>``: every per-object action answers the object as it is now."""
        return self._get(schema, "POST", f"/{resource}/{_seg(ref)}/{action}")

    def _delete(self, resource: str, ref: str | int) -> None:
        self._send("DELETE", f"/{resource}/{_seg(ref)}")

    def list_page(self, resource: str, schema: type[M], params: Params = None) -> Page[M]:
        """One page of a list in the server's query syntax (filters, ``sort``, ``page``, ``per_page``, ``fields``)."""
        return Page[schema].model_validate(self._send("GET", "/" + resource.strip("/"), params=_pairs(params)).json())  # type: ignore[valid-type]

    def list_all(self, resource: str, schema: type[M], params: Params = None) -> list[M]:
        """Every object of a list, fetched ``PER_REQUEST`` at a time."""
        items: list[M] = []
        page = 1
        while True:
            got = self.list_page(
                resource, schema, [*_pairs(params), ("page", str(page)), ("per_page", str(PER_REQUEST))]
            )
            items.extend(got.items)
            if not got.items or len(items) >= got.total:
                return items
            page += 1

    # auth
    def health(self) -> Health:
        return self._get(Health, "GET", "/health", auth=False)

    def login(self, name: str, password: str, tenant: str | None = None, code: str | None = None) -> LoginResult:
        """Open a session; the client then uses its token.  Without a tenant the server looks among the
        supertenant's administrators, then the ``default`` tenant's.  An administrator with a second factor sends
        its ``code``, or gets ``Unauthenticated`` ``totp_required`` whose ``details["challenge"]`` goes to
        ``login_second_factor``."""
        body = _given(name=name, password=password, tenant=tenant, code=code)
        out = self._get(LoginResult, "POST", "/auth/login", json=body, auth=False)
        self.token = out.token
        return out

    def login_second_factor(self, challenge: str, code: str) -> LoginResult:
        """The second step of a login that answered ``totp_required``: the authenticator app's code."""
        body = {"challenge": challenge, "code": code}
        out = self._get(LoginResult, "POST", "/auth/login/second-factor", json=body, auth=False)
        self.token = out.token
        return out

    def logout(self) -> None:
        self._send("POST", "/auth/logout")
        self.token = None

    def whoami(self) -> WhoAmI:
        return self._get(WhoAmI, "GET", "/auth/whoami")

    # users
    def list_users(self, params: Params = None) -> list[User]:
        return self.list_all("users", User, params)

    def get_user(self, user: str | int) -> User:
        return self._get(User, "GET", f"/users/{_seg(user)}")

    def create_user(self, login: str, password: str | None, description: str = "", tenant: str | None = None) -> User:
        body = {"login": login, "password": password, "description": description, **_given(tenant=tenant)}
        return self._get(User, "POST", "/users", json=body)

    def update_user(
        self,
        user: str | int,
        *,
        password: str | None = None,
        blocked: bool | None = None,
        description: str | None = None,
        allowed_networks: str | None = None,
        allowed_hours: str | None = None,
        ssh_keys: list[str] | None = None,
    ) -> User:
        """Change what is given (``ssh_keys``: the user's public keys, replaced whole; ``[]`` removes them)."""
        changes = _given(
            password=password,
            blocked=blocked,
            description=description,
            allowed_networks=allowed_networks,
            allowed_hours=allowed_hours,
            ssh_keys=ssh_keys,
        )
        return self._get(User, "PATCH", f"/users/{_seg(user)}", json=changes)

    def set_user_password(self, user: str | int, password: str) -> User:
        return self.update_user(user, password=password)

    def block_user(self, user: str | int) -> User:
        return self._act(User, "users", user, "block")

    def unblock_user(self, user: str | int) -> User:
        return self._act(User, "users", user, "unblock")

    def delete_user(self, user: str | int) -> None:
        self._delete("users", user)

    # desktops
    def list_desktops(self, user: str | int | None = None, params: Params = None) -> list[Desktop]:
        return self.list_all("desktops", Desktop, [*_pairs(params), *_pairs({"user": user})])

    def create_desktop(
        self,
        name: str,
        user: str | int,
        *,
        osf: str | int | None = None,
        tag: str = "default",
        description: str = "",
        network: str | int | None = None,
    ) -> Desktop:
        """A desktop; ``network`` is the network it is on (default: its OSF's; "": the farm's default network)."""
        body = {"name": name, "user": str(user), "osf": None if osf is None else str(osf), "tag": tag}
        body["description"] = description
        body.update(_given(network=None if network is None else str(network)))
        return self._get(Desktop, "POST", "/desktops", json=body)

    def get_desktop(self, desktop: str | int) -> Desktop:
        return self._get(Desktop, "GET", f"/desktops/{_seg(desktop)}")

    def update_desktop(self, desktop: str | int, **changes: Any) -> Desktop:
        """Change ``name``, ``description``, ``tag``, ``osf`` or ``network`` (the last three only while stopped;
        ``network=""`` moves it to the farm's default network)."""
        return self._get(Desktop, "PATCH", f"/desktops/{_seg(desktop)}", json=changes)

    def delete_desktop(self, desktop: str | int) -> None:
        self._delete("desktops", desktop)

    def desktop_action(self, desktop: str | int, action: str) -> Desktop:
        """``start``, ``stop``, ``block``, ``unblock``, ``disconnect`` or ``reset`` a desktop."""
        return self._act(Desktop, "desktops", desktop, action)

    def start_desktop(self, desktop: str | int) -> Desktop:
        return self.desktop_action(desktop, "start")

    def stop_desktop(self, desktop: str | int) -> Desktop:
        return self.desktop_action(desktop, "stop")

    def block_desktop(self, desktop: str | int) -> Desktop:
        return self.desktop_action(desktop, "block")

    def unblock_desktop(self, desktop: str | int) -> Desktop:
        return self.desktop_action(desktop, "unblock")

    def disconnect_desktop(self, desktop: str | int) -> Desktop:
        return self.desktop_action(desktop, "disconnect")

    def reset_desktop(self, desktop: str | int) -> Desktop:
        return self.desktop_action(desktop, "reset")

    def expire_desktop(self, desktop: str | int, *, soft_s: int | None = None, hard_s: int | None = None) -> Desktop:
        """Set the desktop's expiry deadlines, seconds from now (``None``: no such deadline)."""
        body = {"soft_s": soft_s, "hard_s": hard_s}
        return self._get(Desktop, "POST", f"/desktops/{_seg(desktop)}/expire", json=body)

    def explain_network(
        self, desktop: str | int, dest: str, *, port: int | None = None, proto: str = "tcp"
    ) -> NetworkDecision:
        params = _given(dest=dest, port=port, proto=proto)
        return self._get(NetworkDecision, "GET", f"/desktops/{_seg(desktop)}/network/explain", params=params)

    def console_log(self, desktop: str | int, max_bytes: int = 65536) -> ConsoleLog:
        return self._get(ConsoleLog, "GET", f"/desktops/{_seg(desktop)}/console", params={"bytes": max_bytes})

    def explain_desktop(self, desktop: str | int) -> Explanation:
        return self._get(Explanation, "GET", f"/desktops/{_seg(desktop)}/explain")

    def set_placement_group(self, desktop: str | int, group: str | None, policy: str | None = None) -> Placement:
        body = {"group": group, "policy": policy}
        return self._get(Placement, "PUT", f"/desktops/{_seg(desktop)}/placement", json=body)

    def bulk(
        self,
        resource: str,
        action: str,
        *,
        ids: list[int] | None = None,
        filter: Mapping[str, str | int | float | bool] | None = None,
    ) -> BulkResult:
        """``POST /<resource>/bulk/<action>`` on ids or a list filter: ``ok`` ids and ``failed`` {id: error}."""
        body = {"ids": ids} if ids is not None else {"filter": dict(filter or {})}
        return self._get(BulkResult, "POST", f"/{resource}/bulk/{_seg(action)}", json=body)

    # nodes, statistics
    def list_nodes(self, params: Params = None) -> list[Node]:
        return self.list_all("nodes", Node, params)

    def get_node(self, node: str | int) -> Node:
        return self._get(Node, "GET", f"/nodes/{_seg(node)}")

    def block_node(self, node: str | int) -> Node:
        return self._act(Node, "nodes", node, "block")

    def unblock_node(self, node: str | int) -> Node:
        return self._act(Node, "nodes", node, "unblock")

    def set_node_fence(self, node: str | int, agent: str, options: dict[str, str]) -> Node:
        """Give a node its own fence agent (``fence_ipmilan`` …) and the options it reads on stdin."""
        return self._get(Node, "PUT", f"/nodes/{_seg(node)}/fence", json={"agent": agent, "options": options})

    def clear_node_fence(self, node: str | int) -> Node:
        return self._get(Node, "DELETE", f"/nodes/{_seg(node)}/fence")

    def confirm_node_off(self, node: str | int) -> Node:
        """A lost node's machine is off (checked by hand): release its desktops as after a fence."""
        return self._get(Node, "POST", f"/nodes/{_seg(node)}/fence/confirm")

    def node_action(self, node: str | int, action: str) -> NodeMaintenance:
        """``drain``, ``evacuate``, ``stop`` or ``restart`` a node."""
        return self._act(NodeMaintenance, "nodes", node, action)

    def stats(self) -> Stats:
        return self._get(Stats, "GET", "/stats")

    def time_to_desktop(self, window: str = "24h") -> TimeToDesktop:
        """p50/p95 of each connect phase per image and per node over ``window`` (``30m``, ``24h``, ``7d``)."""
        return self._get(TimeToDesktop, "GET", "/stats/time-to-desktop", params={"window": window})

    # disk images (QVD's DIs)
    def list_images(self, **filters: str) -> list[Image]:
        """Images; ``filters`` use the list syntax (``state="published"``, ``osf="default"``, ``sort="-id"``)."""
        return self.list_all("images", Image, filters)

    def get_image(self, image_id: int) -> Image:
        return self._get(Image, "GET", f"/images/{int(image_id)}")

    def create_image(
        self,
        version: str,
        *,
        osf: str | int | None = None,
        source: str = "upload",
        path: str | None = None,
        build_profile: str | None = None,
        add_packages: list[str] | None = None,
        build_format: str | None = None,
    ) -> Image:
        body: dict[str, Any] = {
            "version": version,
            "osf": None if osf is None else str(osf),
            "source": source,
            "path": path,
        }
        if build_profile or add_packages or build_format:  # else the API's default profile and format
            body["build"] = _build_body(build_profile, add_packages, build_format)
        return self._get(Image, "POST", "/images", json=body)

    def upload_image_chunk(self, image_id: int, data: bytes, *, start: int, total: int) -> Image:
        """Send bytes ``start .. start+len(data)-1`` of a ``total``-byte tarball (``bad_offset`` 409 if misplaced)."""
        headers = {
            "Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}",
            "Content-Type": "application/octet-stream",
        }
        return self._get(Image, "PUT", f"/images/{int(image_id)}/content", content=data, headers=headers)

    def upload_image(
        self,
        image_id: int,
        path: Path,
        *,
        chunk_size: int = 16 << 20,
        progress: Callable[[int, int], None] | None = None,
    ) -> Image:
        """Upload a tarball in chunks, continuing from the bytes the server already has (restartable)."""
        total = path.stat().st_size
        if total == 0:
            raise BadInput(f"{path} is empty", code="bad_path")
        image = self.get_image(image_id)
        offset = image.uploaded_bytes or 0
        with path.open("rb") as f:
            while image.state in (ImageState.NEW, ImageState.UPLOADING) and offset < total:
                if progress is not None:
                    progress(offset, total)
                f.seek(offset)
                data = f.read(chunk_size)
                try:
                    image = self.upload_image_chunk(image_id, data, start=offset, total=total)
                except Conflict as e:
                    expected = (e.details or {}).get("expected")
                    if e.code != "bad_offset" or not isinstance(expected, int) or expected == offset:
                        raise
                    offset = expected  # the server has more (or less) than we thought: continue from there
                    continue
                offset += len(data)
        if progress is not None:
            progress(min(offset, total), total)
        return image

    def import_image(self, image_id: int, path: str) -> Image:
        return self._get(Image, "POST", f"/images/{int(image_id)}/import", json={"path": path})

    def build_image(
        self,
        image_id: int,
        profile: str | None = None,
        add_packages: list[str] | None = None,
        format: str | None = None,
    ) -> Image:
        """Build the image on the API host: ``format="vm"`` makes one that can also boot as a virtual machine."""
        body = _build_body(profile, add_packages, format)
        return self._get(Image, "POST", f"/images/{int(image_id)}/build", json=body)

    def publish_image(
        self,
        image_id: int,
        tags: list[str] | None = None,
        *,
        expire_soft_s: int | None = None,
        expire_hard_s: int | None = None,
    ) -> Image:
        body = {"expire_soft_s": expire_soft_s, "expire_hard_s": expire_hard_s, **_given(tags=tags or None)}
        return self._get(Image, "POST", f"/images/{int(image_id)}/publish", json=body)

    def image_action(self, image_id: int, action: str) -> Image:
        """``build``, ``retire``, ``block`` or ``unblock`` an image."""
        return self._act(Image, "images", int(image_id), action)

    def retire_image(self, image_id: int) -> Image:
        return self.image_action(image_id, "retire")

    def block_image(self, image_id: int) -> Image:
        return self.image_action(image_id, "block")

    def unblock_image(self, image_id: int) -> Image:
        return self.image_action(image_id, "unblock")

    def tag_image(self, image_id: int, tag: str) -> Image:
        return self._get(Image, "PUT", f"/images/{int(image_id)}/tags/{_seg(tag)}")

    def untag_image(self, image_id: int, tag: str) -> Image:
        return self._get(Image, "DELETE", f"/images/{int(image_id)}/tags/{_seg(tag)}")

    def delete_image(self, image_id: int) -> None:
        self._delete("images", int(image_id))

    # OSFs
    def list_osfs(self, **filters: str) -> list[Osf]:
        return self.list_all("osfs", Osf, filters)

    def get_osf(self, osf: str | int) -> Osf:
        return self._get(Osf, "GET", f"/osfs/{_seg(osf)}")

    def create_osf(self, name: str, **fields: Any) -> Osf:
        return self._get(Osf, "POST", "/osfs", json={"name": name, **fields})

    def update_osf(self, osf: str | int, **changes: Any) -> Osf:
        return self._get(Osf, "PATCH", f"/osfs/{_seg(osf)}", json=_given(**changes))

    def delete_osf(self, osf: str | int) -> None:
        self._delete("osfs", osf)

    # tenants
    def list_tenants(self, params: Params = None) -> list[Tenant]:
        return self.list_all("tenants", Tenant, params)

    def get_tenant(self, tenant: str | int) -> Tenant:
        return self._get(Tenant, "GET", f"/tenants/{_seg(tenant)}")

    def create_tenant(self, name: str, description: str = "") -> Tenant:
        return self._get(Tenant, "POST", "/tenants", json={"name": name, "description": description})

    def update_tenant(
        self, tenant: str | int, *, description: str | None = None, blocked: bool | None = None
    ) -> Tenant:
        changes = _given(description=description, blocked=blocked)
        return self._get(Tenant, "PATCH", f"/tenants/{_seg(tenant)}", json=changes)

    def block_tenant(self, tenant: str | int) -> Tenant:
        return self._act(Tenant, "tenants", tenant, "block")

    def unblock_tenant(self, tenant: str | int) -> Tenant:
        return self._act(Tenant, "tenants", tenant, "unblock")

    def delete_tenant(self, tenant: str | int) -> None:
        self._delete("tenants", tenant)

    # administrators
    def list_admins(self, params: Params = None) -> list[Admin]:
        return self.list_all("admins", Admin, params)

    def get_admin(self, admin: str | int) -> Admin:
        return self._get(Admin, "GET", f"/admins/{_seg(admin)}")

    def create_admin(
        self, name: str, password: str, *, tenant: str | None = None, roles: list[str] | None = None
    ) -> Admin:
        body = {"name": name, "password": password, "tenant": tenant, "roles": roles or []}
        return self._get(Admin, "POST", "/admins", json=body)

    def update_admin(
        self,
        admin: str | int,
        *,
        password: str | None = None,
        blocked: bool | None = None,
        roles: list[str] | None = None,
    ) -> Admin:
        changes = _given(password=password, blocked=blocked, roles=roles)
        return self._get(Admin, "PATCH", f"/admins/{_seg(admin)}", json=changes)

    def delete_admin(self, admin: str | int) -> None:
        self._delete("admins", admin)

    # roles and ACLs
    def list_acls(self) -> list[Acl]:
        return self.list_page("acls", Acl).items

    def list_roles(self, params: Params = None) -> list[Role]:
        return self.list_all("roles", Role, params)

    def get_role(self, role: str | int) -> Role:
        return self._get(Role, "GET", f"/roles/{_seg(role)}")

    def create_role(
        self,
        name: str,
        *,
        description: str = "",
        grants: list[tuple[str, bool]] | None = None,
        inherits: list[int] | None = None,
        tenant: str | None = None,
    ) -> Role:
        body = {
            "name": name,
            "description": description,
            "grants": [{"acl": a, "positive": p} for a, p in grants or []],
            "inherits": inherits or [],
            "tenant": tenant,
        }
        return self._get(Role, "POST", "/roles", json=body)

    def update_role(
        self,
        role: str | int,
        *,
        name: str | None = None,
        description: str | None = None,
        grants: list[tuple[str, bool]] | None = None,
        inherits: list[int] | None = None,
    ) -> Role:
        acls = None if grants is None else [{"acl": a, "positive": p} for a, p in grants]
        changes = _given(name=name, description=description, grants=acls, inherits=inherits)
        return self._get(Role, "PATCH", f"/roles/{_seg(role)}", json=changes)

    def delete_role(self, role: str | int) -> None:
        self._delete("roles", role)

    # audit
    def list_audit(self, params: Params = None) -> Page[AuditRecord]:
        """One page of records: the newest first unless ``sort`` says otherwise."""
        return self.list_page("audit", AuditRecord, params)

    def verify_audit(self) -> AuditVerification:
        return self._get(AuditVerification, "GET", "/audit/verify")

    # config
    def list_config(self, tenant: str | None = None, osf: str | None = None) -> list[ConfigEntry]:
        return self.list_page("config", ConfigEntry, {"tenant": tenant, "osf": osf}).items

    def get_config(self, key: str, tenant: str | None = None, osf: str | None = None) -> ConfigEntry:
        return self._get(ConfigEntry, "GET", f"/config/{_seg(key)}", params=_given(tenant=tenant, osf=osf))

    def set_config(self, key: str, value: Any, tenant: str | None = None, osf: str | None = None) -> ConfigEntry:
        body = {"value": value, "tenant": tenant, "osf": osf}
        return self._get(ConfigEntry, "PUT", f"/config/{_seg(key)}", json=body)

    def reset_config(self, key: str, tenant: str | None = None, osf: str | None = None) -> ConfigEntry:
        return self._get(ConfigEntry, "DELETE", f"/config/{_seg(key)}", params=_given(tenant=tenant, osf=osf))

    # custom properties: plain key/value text
    def get_properties(self, object_type: str, object_id: int) -> dict[str, str]:
        return dict(self._send("GET", f"/properties/{_seg(object_type)}/{int(object_id)}").json())

    def set_properties(self, object_type: str, object_id: int, values: dict[str, str]) -> dict[str, str]:
        return dict(self._send("PUT", f"/properties/{_seg(object_type)}/{int(object_id)}", json=values).json())

    def delete_property(self, object_type: str, object_id: int, key: str) -> None:
        self._send("DELETE", f"/properties/{_seg(object_type)}/{int(object_id)}/{_seg(key)}")

    # identity, as administrators see it: login bans, users' second factors and tokens, one's own API tokens
    def list_bans(self) -> list[LoginBan]:
        return self.list_page("auth/bans", LoginBan).items

    def clear_ban(self, key: str) -> None:
        self._send("DELETE", f"/auth/bans/{_seg(key)}")

    def get_second_factor(self, user_id: int) -> UserSecondFactor:
        return self._get(UserSecondFactor, "GET", f"/users/{int(user_id)}/second-factor")

    def reset_second_factor(self, user_id: int) -> None:
        self._send("DELETE", f"/users/{int(user_id)}/second-factor")

    def list_user_tokens(self, user_id: int) -> list[UserToken]:
        return self.list_page(f"users/{int(user_id)}/tokens", UserToken).items

    def revoke_user_token(self, user_id: int, token_id: int) -> None:
        self._send("DELETE", f"/users/{int(user_id)}/tokens/{int(token_id)}")

    def list_own_tokens(self) -> list[AdminToken]:
        return self.list_page("auth/tokens", AdminToken).items

    def create_own_token(self, name: str, days: int | None = None) -> TokenCreated:
        """A new API token for the logged-in administrator; ``token`` (the secret) is in this answer only."""
        return self._get(TokenCreated, "POST", "/auth/tokens", json={"name": name, **_given(days=days)})

    def revoke_own_token(self, token_id: int) -> None:
        self._send("DELETE", f"/auth/tokens/{int(token_id)}")

    # networks (docs/networking.md, "Tenant networks")
    def list_networks(self, params: Params = None) -> list[Network]:
        return self.list_all("networks", Network, params)

    def get_network(self, network: str | int) -> Network:
        return self._get(Network, "GET", f"/networks/{_seg(network)}")

    def create_network(
        self,
        name: str,
        range: str,
        *,
        shared: bool = False,
        tenant: str | None = None,
        description: str = "",
        interface: str | None = None,
        vlan: int | None = None,
        gateway: str | None = None,
    ) -> Network:
        """A private network (of ``tenant``: farm's administrators only), a ``shared`` one to grant to tenants, or
        with ``interface`` a flat one (on that node interface, tagged ``vlan``, its router ``gateway``)."""
        kind = "flat" if interface is not None else "shared" if shared else "private"
        body = {"name": name, "range": range, "kind": kind, "description": description}
        extra = _given(tenant=tenant, interface=interface, vlan=vlan, gateway=gateway)
        return self._get(Network, "POST", "/networks", json={**body, **extra})

    def update_network(self, network: str | int, *, description: str | None = None) -> Network:
        return self._get(Network, "PATCH", f"/networks/{_seg(network)}", json=_given(description=description))

    def delete_network(self, network: str | int) -> None:
        self._delete("networks", network)

    def grant_network(self, network: str | int, tenant: str | int) -> Network:
        """Let ``tenant``'s OSFs and desktops use a shared network."""
        return self._get(Network, "POST", f"/networks/{_seg(network)}/grants", json={"tenant": str(tenant)})

    def revoke_network(self, network: str | int, tenant: str | int) -> None:
        self._send("DELETE", f"/networks/{_seg(network)}/grants/{_seg(tenant)}")

    # warm pools (docs/pools.md)
    def list_pools(self, params: Params = None) -> list[Pool]:
        return self.list_all("pools", Pool, params)

    def get_pool(self, pool: int) -> Pool:
        return self._get(Pool, "GET", f"/pools/{int(pool)}")

    def create_pool(self, osf: str, *, tag: str = "default", size: int, hours: str = "", timezone: str = "UTC") -> Pool:
        body = {"osf": osf, "tag": tag, "size": size, "hours": hours, "timezone": timezone}
        return self._get(Pool, "POST", "/pools", json=body)

    def update_pool(
        self, pool: int, *, size: int | None = None, hours: str | None = None, timezone: str | None = None
    ) -> Pool:
        return self._get(Pool, "PATCH", f"/pools/{int(pool)}", json=_given(size=size, hours=hours, timezone=timezone))

    def delete_pool(self, pool: int) -> None:
        self._send("DELETE", f"/pools/{int(pool)}")

    # volumes (docs/volumes.md)
    def list_volumes(self, params: Params = None) -> list[Volume]:
        return self.list_all("volumes", Volume, params)

    def get_volume(self, volume: str | int) -> Volume:
        return self._get(Volume, "GET", f"/volumes/{_seg(volume)}")

    def create_volume(self, name: str, size_gib: int, *, description: str = "", tenant: str | None = None) -> Volume:
        body = {"name": name, "size_gib": size_gib, "description": description, **_given(tenant=tenant)}
        return self._get(Volume, "POST", "/volumes", json=body)

    def clone_volume(
        self, name: str, volume: str | int, snapshot: str, *, size_gib: int | None = None, description: str = ""
    ) -> Volume:
        """A new volume with the content of ``volume``'s ``snapshot`` (in that volume's tenant)."""
        body = {
            "name": name,
            "from_snapshot": {"volume": str(volume), "snapshot": snapshot},
            "description": description,
            **_given(size_gib=size_gib),
        }
        return self._get(Volume, "POST", "/volumes", json=body)

    def update_volume(
        self, volume: str | int, *, size_gib: int | None = None, description: str | None = None
    ) -> Volume:
        """Grow (``size_gib``, never smaller) or describe a volume."""
        body = _given(size_gib=size_gib, description=description)
        return self._get(Volume, "PATCH", f"/volumes/{_seg(volume)}", json=body)

    def delete_volume(self, volume: str | int) -> None:
        self._delete("volumes", volume)

    def snapshot_volume(self, volume: str | int, name: str) -> VolumeSnapshot:
        return self._get(VolumeSnapshot, "POST", f"/volumes/{_seg(volume)}/snapshots", json={"name": name})

    def list_volume_snapshots(self, volume: str | int) -> list[VolumeSnapshot]:
        return self.list_page(f"volumes/{_seg(volume)}/snapshots", VolumeSnapshot).items

    def delete_volume_snapshot(self, volume: str | int, name: str) -> None:
        self._send("DELETE", f"/volumes/{_seg(volume)}/snapshots/{_seg(name)}")

    def attach_volume(self, volume: str | int, desktop: str | int, *, read_only: bool = False) -> Volume:
        """Attach to a desktop; a running VM gets it at once (the call waits up to a minute for its node)."""
        body = {"desktop": str(desktop), "read_only": read_only}
        return self._get(Volume, "POST", f"/volumes/{_seg(volume)}/attach", json=body, timeout=NODE_WAIT_TIMEOUT)

    def detach_volume(self, volume: str | int, desktop: str | int) -> Volume:
        """Detach from a desktop (``volume_held`` while its running guest has the volume mounted)."""
        body = {"desktop": str(desktop)}
        return self._get(Volume, "POST", f"/volumes/{_seg(volume)}/detach", json=body, timeout=NODE_WAIT_TIMEOUT)
