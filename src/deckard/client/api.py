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

from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from deckard.model.errors import (
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
        verify = client_context(ca) if ca is not None else True  # None: the system's trust store
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

    def _request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None, auth: bool = True
    ) -> Any:
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

    # auth
    def health(self) -> Row:
        out: Row = self._request("GET", "/health", auth=False)
        return out

    def login(self, name: str, password: str, tenant: str = "default") -> Row:
        """Open a session; the client then uses its token.  Returns ``{token, expires_at}``."""
        body = {"name": name, "password": password, "tenant": tenant}
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
    def list_users(self) -> list[Row]:
        return self._items("/users")

    def get_user(self, user: str | int) -> Row:
        out: Row = self._request("GET", f"/users/{_seg(user)}")
        return out

    def create_user(self, login: str, password: str | None, description: str = "") -> Row:
        out: Row = self._request(
            "POST", "/users", json={"login": login, "password": password, "description": description}
        )
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
    def list_desktops(self, user: str | int | None = None) -> list[Row]:
        return self._items("/desktops", params={"user": str(user)} if user is not None else None)

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

    # nodes, images, OSFs
    def list_nodes(self) -> list[Row]:
        return self._items("/nodes")

    def list_images(self) -> list[Row]:
        return self._items("/images")

    def list_osfs(self) -> list[Row]:
        return self._items("/osfs")
