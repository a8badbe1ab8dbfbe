"""A typed, synchronous client of the admin API, used by the CLI, tests and benchmarks.

It speaks only HTTPS and trusts only the farm's CA (``ca``), never the environment's proxies or an
"accept any certificate" switch.  An error envelope from the server comes back as the same exception class
the server raised (``deckard.model.errors``), with its ``code``, ``message`` and ``details`` kept, so callers
handle a remote error exactly like a local one::

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
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from deckard.model.errors import (
    BadInput,
    Conflict,
    DeckardError,
    Unavailable,
    error_class_for_status,
)
from deckard.runtime.tls import client_context

API_PREFIX = "/api/v1"

Row = dict[str, Any]


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


def _seg(ref: str | int) -> str:
    # names are restricted by the server, but a path segment must never smuggle '/' or '?'
    return quote(str(ref), safe="")


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
            verify = client_context(ca)
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

    def _request(self, method: str, path: str, *, json: Any = None, params: Any = None, auth: bool = True) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if auth and self.token else {}
        try:
            response = self._http.request(method, path, json=json, params=params, headers=headers)
        except httpx.TransportError as e:
            raise Unavailable(
                f"cannot reach the Deckard API at {self.url}: {e or type(e).__name__} "
                "(is the farm running? `deckard up` starts it)",
                code="api_unreachable",
            ) from e
        if response.status_code >= 400:
            raise error_from_response(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def _items(self, path: str, params: dict[str, Any] | None = None) -> list[Row]:
        items: list[Row] = self._request("GET", path, params=params)["items"]
        return items

    def list_all(self, path: str, params: list[tuple[str, str]] | None = None) -> list[Row]:
        """Every row of a paged list (``{items, total}``), fetched 1,000 at a time."""
        items: list[Row] = []
        page = 1
        while True:
            query = [*(params or []), ("page", str(page)), ("per_page", "1000")]
            got = self._request("GET", path, params=query)
            items.extend(got["items"])
            if not got["items"] or len(items) >= got["total"]:
                return items
            page += 1

    # auth
    def health(self) -> Row:
        out: Row = self._request("GET", "/health", auth=False)
        return out

    def login(self, name: str, password: str, tenant: str | None = None) -> Row:
        """Open a session; the client then uses its token.  Returns ``{token, expires_at}``.  Without a tenant the
        server looks among the supertenant's administrators, then the ``default`` tenant's."""
        body: Row = {"name": name, "password": password}
        if tenant is not None:
            body["tenant"] = tenant
        out: Row = self._request("POST", "/auth/login", json=body, auth=False)
        self.token = out["token"]
        return out

    def logout(self) -> None:
        self._request("POST", "/auth/logout")
        self.token = None

    def whoami(self) -> Row:
        out: Row = self._request("GET", "/auth/whoami")
        return out

    # users
    def list_users(self, params: list[tuple[str, str]] | None = None) -> list[Row]:
        return self.list_all("/users", params)

    def get_user(self, user: str | int) -> Row:
        out: Row = self._request("GET", f"/users/{_seg(user)}")
        return out

    def create_user(self, login: str, password: str | None, description: str = "", tenant: str | None = None) -> Row:
        body = {"login": login, "password": password, "description": description}
        if tenant is not None:
            body["tenant"] = tenant
        out: Row = self._request("POST", "/users", json=body)
        return out

    def update_user(
        self,
        user: str | int,
        *,
        password: str | None = None,
        blocked: bool | None = None,
        description: str | None = None,
    ) -> Row:
        asked = {"password": password, "blocked": blocked, "description": description}
        changes = {k: v for k, v in asked.items() if v is not None}
        out: Row = self._request("PATCH", f"/users/{_seg(user)}", json=changes)
        return out

    def set_user_password(self, user: str | int, password: str) -> Row:
        return self.update_user(user, password=password)

    def block_user(self, user: str | int) -> Row:
        return self.update_user(user, blocked=True)

    def unblock_user(self, user: str | int) -> Row:
        return self.update_user(user, blocked=False)

    def delete_user(self, user: str | int) -> None:
        self._request("DELETE", f"/users/{_seg(user)}")

    # desktops
    def list_desktops(self, user: str | int | None = None, params: list[tuple[str, str]] | None = None) -> list[Row]:
        return self.list_all("/desktops", [*(params or []), *([("user", str(user))] if user is not None else [])])

    def create_desktop(
        self, name: str, user: str | int, *, osf: str | int | None = None, tag: str = "default", description: str = ""
    ) -> Row:
        body = {
            "name": name,
            "user": str(user),
            "osf": None if osf is None else str(osf),
            "tag": tag,
            "description": description,
        }
        out: Row = self._request("POST", "/desktops", json=body)
        return out

    def get_desktop(self, desktop: str | int) -> Row:
        out: Row = self._request("GET", f"/desktops/{_seg(desktop)}")
        return out

    def delete_desktop(self, desktop: str | int) -> None:
        self._request("DELETE", f"/desktops/{_seg(desktop)}")

    def _desktop_action(self, desktop: str | int, action: str) -> Row:
        out: Row = self._request("POST", f"/desktops/{_seg(desktop)}/{action}")
        return out

    def start_desktop(self, desktop: str | int) -> Row:
        return self._desktop_action(desktop, "start")

    def stop_desktop(self, desktop: str | int) -> Row:
        return self._desktop_action(desktop, "stop")

    def block_desktop(self, desktop: str | int) -> Row:
        return self._desktop_action(desktop, "block")

    def unblock_desktop(self, desktop: str | int) -> Row:
        return self._desktop_action(desktop, "unblock")

    def update_desktop(self, desktop: str | int, **changes: Any) -> Row:
        """Change ``name``, ``description``, ``tag`` or ``osf`` (the last two only while stopped)."""
        out: Row = self._request("PATCH", f"/desktops/{_seg(desktop)}", json=changes)
        return out

    def disconnect_desktop(self, desktop: str | int) -> Row:
        return self._desktop_action(desktop, "disconnect")

    def reset_desktop(self, desktop: str | int) -> Row:
        return self._desktop_action(desktop, "reset")

    def bulk(
        self, resource: str, action: str, *, ids: list[int] | None = None, filter: dict[str, str] | None = None
    ) -> Row:
        """``POST /<resource>/bulk/<action>`` on ids or a list filter: ``{"ok": [ids], "failed": {id: error}}``."""
        body: Row = {"ids": ids} if ids is not None else {"filter": filter or {}}
        out: Row = self._request("POST", f"/{resource}/bulk/{_seg(action)}", json=body)
        return out

    # nodes (admin), connection history, statistics
    def get_node(self, node: str | int) -> Row:
        out: Row = self._request("GET", f"/nodes/{_seg(node)}")
        return out

    def block_node(self, node: str | int) -> Row:
        out: Row = self._request("POST", f"/nodes/{_seg(node)}/block")
        return out

    def unblock_node(self, node: str | int) -> Row:
        out: Row = self._request("POST", f"/nodes/{_seg(node)}/unblock")
        return out

    def stats(self) -> Row:
        out: Row = self._request("GET", "/stats")
        return out

    # nodes, images, OSFs
    def list_nodes(self, params: list[tuple[str, str]] | None = None) -> list[Row]:
        return self.list_all("/nodes", params)

    # farm: placement and node maintenance
    def explain_desktop(self, desktop: str | int) -> Row:
        out: Row = self._request("GET", f"/desktops/{_seg(desktop)}/explain")
        return out

    def set_placement_group(self, desktop: str | int, group: str | None, policy: str | None = None) -> Row:
        out: Row = self._request("PUT", f"/desktops/{_seg(desktop)}/placement", json={"group": group, "policy": policy})
        return out

    def node_action(self, node: str | int, action: str) -> Row:
        """``drain``, ``evacuate`` or ``stop`` a node."""
        out: Row = self._request("POST", f"/nodes/{_seg(node)}/{action}")
        return out

    def list_images(self, **filters: str) -> list[Row]:
        """Images; ``filters`` use the list syntax (``state="published"``, ``osf="default"``, ``sort="-id"``)."""
        return self._items("/images", params=filters or None)

    def list_osfs(self, **filters: str) -> list[Row]:
        return self._items("/osfs", params=filters or None)

    # disk images (QVD's DIs)
    def get_image(self, image_id: int) -> Row:
        out: Row = self._request("GET", f"/images/{int(image_id)}")
        return out

    def create_image(
        self, version: str, *, osf: str | int | None = None, source: str = "upload", path: str | None = None
    ) -> Row:
        body = {"version": version, "osf": None if osf is None else str(osf), "source": source, "path": path}
        out: Row = self._request("POST", "/images", json=body)
        return out

    def upload_image_chunk(self, image_id: int, data: bytes, *, start: int, total: int) -> Row:
        """Send bytes ``start .. start+len(data)-1`` of a ``total``-byte tarball (``bad_offset`` 409 if misplaced)."""
        headers = {"Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}"}
        out: Row = self._send("PUT", f"/images/{int(image_id)}/content", content=data, headers=headers)
        return out

    def upload_image(
        self,
        image_id: int,
        path: Path,
        *,
        chunk_size: int = 16 << 20,
        progress: Callable[[int, int], None] | None = None,
    ) -> Row:
        """Upload a tarball in chunks, continuing from the bytes the server already has (restartable)."""
        total = path.stat().st_size
        if total == 0:
            raise BadInput(f"{path} is empty", code="bad_path")
        row = self.get_image(image_id)
        offset = int(row.get("uploaded_bytes") or 0)
        with path.open("rb") as f:
            while row.get("state") in ("new", "uploading") and offset < total:
                if progress is not None:
                    progress(offset, total)
                f.seek(offset)
                data = f.read(chunk_size)
                try:
                    row = self.upload_image_chunk(image_id, data, start=offset, total=total)
                except Conflict as e:
                    expected = (e.details or {}).get("expected")
                    if e.code != "bad_offset" or not isinstance(expected, int) or expected == offset:
                        raise
                    offset = expected  # the server has more (or less) than we thought: continue from there
                    continue
                offset += len(data)
        if progress is not None:
            progress(min(offset, total), total)
        return row

    def import_image(self, image_id: int, path: str) -> Row:
        out: Row = self._request("POST", f"/images/{int(image_id)}/import", json={"path": path})
        return out

    def build_image(self, image_id: int) -> Row:
        out: Row = self._request("POST", f"/images/{int(image_id)}/build")
        return out

    def publish_image(
        self,
        image_id: int,
        tags: list[str] | None = None,
        *,
        expire_soft_s: int | None = None,
        expire_hard_s: int | None = None,
    ) -> Row:
        body: Row = {"expire_soft_s": expire_soft_s, "expire_hard_s": expire_hard_s}
        if tags:
            body["tags"] = tags
        out: Row = self._request("POST", f"/images/{int(image_id)}/publish", json=body)
        return out

    def _image_action(self, image_id: int, action: str) -> Row:
        out: Row = self._request("POST", f"/images/{int(image_id)}/{action}")
        return out

    def retire_image(self, image_id: int) -> Row:
        return self._image_action(image_id, "retire")

    def block_image(self, image_id: int) -> Row:
        return self._image_action(image_id, "block")

    def unblock_image(self, image_id: int) -> Row:
        return self._image_action(image_id, "unblock")

    def tag_image(self, image_id: int, tag: str) -> Row:
        out: Row = self._request("PUT", f"/images/{int(image_id)}/tags/{_seg(tag)}")
        return out

    def untag_image(self, image_id: int, tag: str) -> Row:
        out: Row = self._request("DELETE", f"/images/{int(image_id)}/tags/{_seg(tag)}")
        return out

    def delete_image(self, image_id: int) -> None:
        self._request("DELETE", f"/images/{int(image_id)}")

    def _send(self, method: str, path: str, *, content: bytes, headers: dict[str, str]) -> Any:
        """A request with a raw body (uploads): same errors as ``_request``."""
        if self.token:
            headers = {**headers, "Authorization": f"Bearer {self.token}"}
        headers.setdefault("Content-Type", "application/octet-stream")
        try:
            response = self._http.request(method, path, content=content, headers=headers)
        except httpx.TransportError as e:
            raise Unavailable(
                f"cannot reach the Deckard API at {self.url}: {e or type(e).__name__}", code="api_unreachable"
            ) from e
        if response.status_code >= 400:
            raise error_from_response(response)
        return response.json() if response.content else None

    # OSFs
    def get_osf(self, osf: str | int) -> Row:
        out: Row = self._request("GET", f"/osfs/{_seg(osf)}")
        return out

    def create_osf(self, name: str, **fields: Any) -> Row:
        out: Row = self._request("POST", "/osfs", json={"name": name, **fields})
        return out

    def update_osf(self, osf: str | int, **changes: Any) -> Row:
        body = {k: v for k, v in changes.items() if v is not None}
        out: Row = self._request("PATCH", f"/osfs/{_seg(osf)}", json=body)
        return out

    def delete_osf(self, osf: str | int) -> None:
        self._request("DELETE", f"/osfs/{_seg(osf)}")

    # lists with the server's query syntax (filters, sort, page, fields): the whole page, ``{items, total}``
    def list_page(self, resource: str, params: dict[str, Any] | list[tuple[str, str]] | None = None) -> Row:
        out: Row = self._request("GET", "/" + resource.strip("/"), params=params)
        return out

    # tenants
    def list_tenants(self, params: dict[str, Any] | None = None) -> list[Row]:
        return self._items("/tenants", params)

    def get_tenant(self, tenant: str | int) -> Row:
        out: Row = self._request("GET", f"/tenants/{_seg(tenant)}")
        return out

    def create_tenant(self, name: str, description: str = "") -> Row:
        out: Row = self._request("POST", "/tenants", json={"name": name, "description": description})
        return out

    def update_tenant(self, tenant: str | int, *, description: str | None = None, blocked: bool | None = None) -> Row:
        changes = {k: v for k, v in (("description", description), ("blocked", blocked)) if v is not None}
        out: Row = self._request("PATCH", f"/tenants/{_seg(tenant)}", json=changes)
        return out

    def block_tenant(self, tenant: str | int) -> Row:
        out: Row = self._request("POST", f"/tenants/{_seg(tenant)}/block")
        return out

    def unblock_tenant(self, tenant: str | int) -> Row:
        out: Row = self._request("POST", f"/tenants/{_seg(tenant)}/unblock")
        return out

    def delete_tenant(self, tenant: str | int) -> None:
        self._request("DELETE", f"/tenants/{_seg(tenant)}")

    # administrators
    def list_admins(self, params: dict[str, Any] | None = None) -> list[Row]:
        return self._items("/admins", params)

    def get_admin(self, admin: str | int) -> Row:
        out: Row = self._request("GET", f"/admins/{_seg(admin)}")
        return out

    def create_admin(
        self, name: str, password: str, *, tenant: str | None = None, roles: list[str] | None = None
    ) -> Row:
        body = {"name": name, "password": password, "tenant": tenant, "roles": roles or []}
        out: Row = self._request("POST", "/admins", json=body)
        return out

    def update_admin(
        self,
        admin: str | int,
        *,
        password: str | None = None,
        blocked: bool | None = None,
        roles: list[str] | None = None,
    ) -> Row:
        asked = {"password": password, "blocked": blocked, "roles": roles}
        out: Row = self._request(
            "PATCH", f"/admins/{_seg(admin)}", json={k: v for k, v in asked.items() if v is not None}
        )
        return out

    def delete_admin(self, admin: str | int) -> None:
        self._request("DELETE", f"/admins/{_seg(admin)}")

    # roles and ACLs
    def list_acls(self) -> list[Row]:
        return self._items("/acls")

    def list_roles(self, params: dict[str, Any] | None = None) -> list[Row]:
        return self._items("/roles", params)

    def get_role(self, role: str | int) -> Row:
        out: Row = self._request("GET", f"/roles/{_seg(role)}")
        return out

    def create_role(
        self,
        name: str,
        *,
        description: str = "",
        grants: list[tuple[str, bool]] | None = None,
        inherits: list[int] | None = None,
        tenant: str | None = None,
    ) -> Row:
        body = {
            "name": name,
            "description": description,
            "grants": [{"acl": a, "positive": p} for a, p in grants or []],
            "inherits": inherits or [],
            "tenant": tenant,
        }
        out: Row = self._request("POST", "/roles", json=body)
        return out

    def update_role(
        self,
        role: str | int,
        *,
        name: str | None = None,
        description: str | None = None,
        grants: list[tuple[str, bool]] | None = None,
        inherits: list[int] | None = None,
    ) -> Row:
        body: Row = {k: v for k, v in (("name", name), ("description", description)) if v is not None}
        if grants is not None:
            body["grants"] = [{"acl": a, "positive": p} for a, p in grants]
        if inherits is not None:
            body["inherits"] = inherits
        out: Row = self._request("PATCH", f"/roles/{_seg(role)}", json=body)
        return out

    def delete_role(self, role: str | int) -> None:
        self._request("DELETE", f"/roles/{_seg(role)}")

    # audit
    def list_audit(self, params: dict[str, Any] | None = None) -> Row:
        """``{items, total}``: the newest records first unless ``sort`` says otherwise."""
        out: Row = self._request("GET", "/audit", params=params)
        return out

    def verify_audit(self) -> Row:
        out: Row = self._request("GET", "/audit/verify")
        return out

    # config
    def list_config(self, tenant: str | None = None) -> list[Row]:
        return self._items("/config", {"tenant": tenant} if tenant else None)

    def get_config(self, key: str, tenant: str | None = None) -> Row:
        out: Row = self._request("GET", f"/config/{_seg(key)}", params={"tenant": tenant} if tenant else None)
        return out

    def set_config(self, key: str, value: Any, tenant: str | None = None) -> Row:
        out: Row = self._request("PUT", f"/config/{_seg(key)}", json={"value": value, "tenant": tenant})
        return out

    def reset_config(self, key: str, tenant: str | None = None) -> Row:
        out: Row = self._request("DELETE", f"/config/{_seg(key)}", params={"tenant": tenant} if tenant else None)
        return out

    # custom properties
    def get_properties(self, object_type: str, object_id: int) -> dict[str, str]:
        out: dict[str, str] = self._request("GET", f"/properties/{_seg(object_type)}/{int(object_id)}")
        return out

    def set_properties(self, object_type: str, object_id: int, values: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = self._request("PUT", f"/properties/{_seg(object_type)}/{int(object_id)}", json=values)
        return out

    def delete_property(self, object_type: str, object_id: int, key: str) -> None:
        self._request("DELETE", f"/properties/{_seg(object_type)}/{int(object_id)}/{_seg(key)}")
