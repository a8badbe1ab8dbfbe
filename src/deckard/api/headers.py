"""Security headers on every response of the API, the web admin (``/admin``) and the portal (``/``).

A pure ASGI middleware wrapped around the whole app (outside Starlette's error middleware, so 413s and 500s
carry them too).  What each header is for:

* ``Content-Security-Policy``: pages load scripts, styles and fonts only from this origin (no inline script or
  style: the pages are static shells, ``web/`` bundles everything), images also from ``data:``/``blob:``
  (noVNC's cursors), and connect only to this origin and to the brokers' WebSocket origins (the portal and the
  spy page open ``broker_ws_url`` from a ticket); nothing may frame them.  Responses that are not HTML get a
  policy that allows nothing at all.
* ``X-Frame-Options: DENY`` (old browsers' ``frame-ancestors``), ``X-Content-Type-Options: nosniff``,
  ``Referrer-Policy: no-referrer`` (tokens never travel in a Referer), ``Strict-Transport-Security`` (the API
  is only served over TLS), ``Cross-Origin-Opener-Policy: same-origin``.

A response that sets one of these headers itself keeps its own value.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

BrokerOrigins = Callable[[str], Awaitable[Sequence[str]]]
"""Given the request's host name, the ``wss://host:port`` origins of the farm's brokers."""

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

FIXED: tuple[tuple[bytes, bytes], ...] = (
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"strict-transport-security", b"max-age=31536000"),
    (b"cross-origin-opener-policy", b"same-origin"),
)


def page_csp(broker_origins: Sequence[str]) -> str:
    """The policy of an HTML page."""
    connect = " ".join(["'self'", *sorted(set(broker_origins))])
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data: blob:",
            "font-src 'self'",
            f"connect-src {connect}",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


def _host(scope: Scope) -> str:
    """The request's host name; anything but a plain name or address (it goes into a header) is ignored."""
    for name, value in scope.get("headers", ()):
        if name == b"host":
            host: str = value.decode("latin-1")
            host = host if host.endswith("]") else host.rsplit(":", 1)[0] if ":" in host else host
            if _HOST.fullmatch(host):
                return host.strip("[]")
            break
    server = scope.get("server")
    return str(server[0]) if server else "127.0.0.1"


class SecurityHeaders:
    """Wraps an ASGI app; see the module docstring."""

    def __init__(self, app: ASGIApp, broker_origins: BrokerOrigins) -> None:
        self.app = app
        self.broker_origins = broker_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in FIXED if k not in present]
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", (await self._csp(scope, headers)).encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _csp(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> str:
        content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        if not content_type.startswith(b"text/html"):
            return API_CSP
        return page_csp(await self.broker_origins(_host(scope)))
