"""The audit middleware: every administrator action that reaches a route is recorded in the audit log.

Why a middleware and not a call in every route: a route added tomorrow is audited without anyone remembering
to, and failures (403, 404, 409, validation errors, crashes) are recorded exactly like successes.

What it records, for every request that is not GET/HEAD/OPTIONS and matched an API route: who (the ``Actor``
``api/deps.py`` put on ``request.state``, or the ``name`` of a login attempt), their tenant, the action derived
from the route (``POST /desktops/{desktop}/start`` → ``desktop.start``, ``POST /users`` → ``user.create``,
``PATCH`` → ``update``, ``DELETE`` → ``delete``), the object type and id from the path, the JSON body with
secrets masked, ok/failed, the HTTP status and error code, the source address and the time.

The record is written *before* the response leaves (the response is held until then), so a client that sees an
answer can already find its record.  A streaming or large response is passed through and recorded at its end.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from fastapi import FastAPI
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deckard.db.engine import Database
from deckard.model.config_keys import KEYS
from deckard.services.audit import MASK, append_audit

log = structlog.get_logger("deckard.api.audit")

AUDITED_PREFIX = "/api/v1"
SKIPPED_METHODS = {"GET", "HEAD", "OPTIONS"}
MAX_ARGUMENTS = 64 * 1024  # bodies beyond this (uploads) are described, not stored
MAX_HELD = 256 * 1024
STREAMING_TYPES = (b"text/event-stream", b"application/x-ndjson")
LOGIN_SECRETS = ("challenge", "code")  # /auth/* bodies: masked like passwords


def describe_action(method: str, template: str, path_params: dict[str, Any]) -> tuple[str, str, str]:
    """(action, object type, object id) of a route: ``POST /api/v1/desktops/{desktop}/start`` → desktop.start."""
    parts = [p for p in template.removeprefix(AUDITED_PREFIX).split("/") if p]
    if not parts:
        return method.lower(), "", ""
    resource = parts[0]
    obj = resource[:-3] + "y" if resource.endswith("ies") else resource.removesuffix("s")
    params = [p[1:-1].split(":")[0] for p in parts[1:] if p.startswith("{")]  # {key:path} → key
    verbs = [p for p in parts[1:] if not p.startswith("{")]
    if "object_type" in path_params:
        obj = str(path_params["object_type"])
        params = [p for p in params if p != "object_type"]
    object_id = str(path_params.get(params[0], "")) if params else ""
    if resource == "properties":
        verb = {"PUT": "property.update", "DELETE": "property.delete"}.get(method, f"property.{method.lower()}")
        return verb, obj, object_id
    if verbs:
        return f"{obj}.{'.'.join(verbs)}", obj, object_id
    verb = {"POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}.get(method, method.lower())
    return f"{obj}.{verb}", obj, object_id


def _route_of(app: ASGIApp, scope: Scope) -> Any:
    route = scope.get("route")
    if route is not None:
        return route
    for candidate in getattr(app, "routes", ()):
        match, _child = candidate.matches(scope)
        if match == Match.FULL:
            return candidate
    return None


def _arguments(body: bytes, truncated: bool, content_type: str, query: str) -> Any:
    args: Any
    if truncated:
        args = {"_body": f"{content_type or 'body'} over {MAX_ARGUMENTS} bytes"}
    elif not body:
        args = {}
    else:
        try:
            args = json.loads(body)
        except ValueError:
            args = {"_body": f"{len(body)} bytes of {content_type or 'data'}"}
    if query:
        args = {"_query": query, **args} if isinstance(args, dict) else {"_query": query, "_body": args}
    return args


def _login_arguments(arguments: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """A login's arguments: its challenge and code masked (a live challenge lets one try codes), and who checked
    the password and which factor was used, as the route put them on ``request.state``."""
    out = {k: (MASK if k in LOGIN_SECRETS and v else v) for k, v in arguments.items()}
    for key in ("plugin", "factor"):
        if state.get(f"login_{key}"):
            out[key] = str(state[f"login_{key}"])
    return out


class AuditMiddleware:
    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in SKIPPED_METHODS
            or not scope["path"].startswith(AUDITED_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        truncated = False

        async def receive_and_keep() -> Message:
            nonlocal truncated
            message = await receive()
            if message["type"] == "http.request" and not truncated:
                chunk = message.get("body", b"")
                if len(body) + len(chunk) > MAX_ARGUMENTS:
                    truncated = True
                    body.clear()
                else:
                    body.extend(chunk)
            return message

        held: list[Message] = []
        held_size = 0
        passing = False  # True once the response is streamed through
        status = 500
        error_body = bytearray()
        recorded = False

        async def record(error_code: str = "") -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            code = error_code
            if not code and status >= 400 and error_body:
                try:
                    code = str(json.loads(error_body)["error"]["code"])
                except (ValueError, KeyError, TypeError):
                    code = "http_error"
            await self._record(scope, bytes(body), truncated, status, code)

        async def send_after_record(message: Message) -> None:
            nonlocal held_size, passing, status
            if passing:
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    await record()
                await send(message)
                return
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = dict(message.get("headers", []))
                if headers.get(b"content-type", b"").startswith(STREAMING_TYPES):
                    passing = True
                    await send(message)
                    return
                held.append(message)
                return
            if message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if status >= 400 and len(error_body) < 8192:
                    error_body.extend(chunk[:8192])
                held.append(message)
                held_size += len(chunk)
                if not message.get("more_body", False):
                    await record()
                if not message.get("more_body", False) or held_size > MAX_HELD:
                    passing = held_size > MAX_HELD and message.get("more_body", False)
                    for m in held:
                        await send(m)
                    held.clear()
                return
            await send(message)

        try:
            await self.app(scope, receive_and_keep, send_after_record)
        except BaseException:
            if not recorded:
                status = 500
                await record("internal")
            raise
        finally:
            if held:  # the app ended without finishing its answer: let the client have what there is
                for m in held:
                    await send(m)

    async def _record(self, scope: Scope, body: bytes, truncated: bool, status: int, error_code: str) -> None:
        route = _route_of(self.fastapi_app.router, scope)
        template = getattr(route, "path", None)
        if template is None:
            return  # no such route: nothing was done
        path_params = scope.get("path_params") or {}
        action, object_type, object_id = describe_action(scope["method"], template, path_params)
        headers = dict(scope.get("headers", []))
        content_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0]
        arguments = _arguments(body, truncated, content_type, scope.get("query_string", b"").decode("latin-1"))
        key = KEYS.get(object_id) if object_type == "config" else None
        if key is not None and key.secret and isinstance(arguments, dict) and "value" in arguments:
            arguments = {**arguments, "value": MASK}  # a directory's or provider's password is not an argument
        state = scope.get("state") or {}
        actor = state.get("actor")
        admin_id, admin_name, tenant_id = None, "", None
        if actor is not None:
            admin_id, admin_name, tenant_id = actor.id, actor.name, actor.tenant_id
        elif isinstance(arguments, dict) and isinstance(arguments.get("name"), str) and action == "auth.login":
            admin_name = arguments["name"]
        elif action.startswith("auth.login") and state.get("login_name"):  # the second step names no one
            admin_name = str(state["login_name"])
        if object_type == "auth" and isinstance(arguments, dict):
            arguments = _login_arguments(arguments, state)
        client = scope.get("client")
        db: Database = self.fastapi_app.state.db
        try:
            await append_audit(
                db,
                action=action,
                result="ok" if status < 400 else "failed",
                admin_id=admin_id,
                admin_name=admin_name,
                tenant_id=tenant_id,
                object_type=object_type,
                object_id=object_id,
                arguments=arguments,
                status=status,
                error_code=error_code,
                source=client[0] if client else "",
            )
        except Exception as e:  # the action happened; a lost audit record must at least be loud
            log.error("audit.write_failed", action=action, status=status, exc_info=e)


def install_audit_log(app: FastAPI) -> None:
    app.add_middleware(AuditMiddleware, fastapi_app=app)
