"""A cap on request bodies, enforced before the application reads them (pure ASGI middleware).

Why here and not in the routes: FastAPI reads a JSON body whole into memory before a route (or its
authentication) runs, so ``POST /auth/login`` with 200 MB cost 300 MB of RSS to an anonymous client.  This
layer sits outside the app and

* refuses at once (413 ``body_too_large``, in the usual error envelope, ``Connection: close``) a request whose
  ``Content-Length`` is above the limit of its route — the app never sees it;
* counts the bytes of a body that comes without a length (chunked) or lies about it, and once past the limit
  answers 413 the same way and tells the app the client went away (``http.disconnect``), so at most one chunk
  past the limit is ever held.

Either way the answer goes out whole first, and then the connection *lingers* (nginx's lingering close): what the
client still sends is read and dropped, up to ``DRAIN_MAX_BYTES`` or ``DRAIN_MAX_S``, before it is closed.  A
socket closed with unread bytes in it sends a TCP reset, and a reset can reach the client before it has read the
413, which it then never sees (it saw a "connection reset" instead).  A client that asked ``Expect: 100-continue``
has sent no body and gets no lingering.

Limits are per path pattern (first match wins, then the default): JSON routes get a small one, the image
upload route (which streams to disk and has its own per-tenant quota) a large one.

The request head is capped here too (431 ``headers_too_large``): the HTTP parser's own cap
(``h11_max_incomplete_event_size``, ``api/server.py``) only applies to a head still arriving, not to one that
came in a single read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("deckard.api")

CODE = "body_too_large"
HEAD_CODE = "headers_too_large"
DRAIN_MAX_BYTES = 8 << 20  # a refused body still read and dropped so that the 413 reaches its client
DRAIN_MAX_S = 2.0


@dataclass(frozen=True)
class BodyLimitRule:
    """Requests whose path matches ``pattern`` (a regular expression, matched from the start) may send
    ``max_bytes``."""

    pattern: str
    max_bytes: int


def _too_large(limit: int, status: int = 413) -> tuple[dict[str, object], bytes]:
    what, code = ("request body", CODE) if status == 413 else ("request line and headers", HEAD_CODE)
    body = json.dumps(
        {
            "error": {
                "code": code,
                "message": f"the {what} is larger than this server accepts here ({limit} bytes)",
                "details": {"max_bytes": limit},
            }
        }
    ).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    }
    return start, body


class BodyLimit:
    """Wraps an ASGI app; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        default_max_bytes: int,
        rules: Sequence[BodyLimitRule] = (),
        max_header_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.default = default_max_bytes
        self.rules = [(re.compile(r.pattern), r.max_bytes) for r in rules]
        self.max_header_bytes = max_header_bytes

    def limit_for(self, path: str) -> int:
        for pattern, max_bytes in self.rules:
            if pattern.match(path):
                return max_bytes
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.max_header_bytes is not None:
            head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            head += sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
            if head > self.max_header_bytes:
                log.info("api.headers_too_large", path=scope["path"][:200], size=head, limit=self.max_header_bytes)
                await _refuse(scope, receive, send, self.max_header_bytes, 431)
                return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            log.info("api.body_too_large", path=scope["path"], declared=declared, limit=limit)
            await _refuse(scope, receive, send, limit)
            return

        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    log.info("api.body_too_large", path=scope["path"], received=received, limit=limit)
                    if not started:
                        await _refuse(scope, receive, send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out; whatever the app answers to the "disconnect" goes nowhere
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            # the HTTP parser (h11) already refused a malformed or conflicting length
            return int(value) if value.isdigit() else None
    return None


async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int, status: int = 413) -> None:
    """Sends the refusal whole, then reads and drops the rest of the request (bounded) and only then ends the
    response, which closes the connection; see the module docstring."""
    start, body = _too_large(limit, status)
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": True})
    if not any(name == b"expect" for name, _ in scope.get("headers", ())):
        drained = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_MAX_S):
                while drained <= DRAIN_MAX_BYTES:
                    message = await receive()
                    if message["type"] != "http.request":
                        break
                    drained += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
    await send({"type": "http.response.body", "body": b"", "more_body": False})
