"""``GET /metrics``: this process's Prometheus series (runtime/metrics.py), for the farm's administrators only.

Who may read it: an administrator of the supertenant holding ``stats.see`` (the series describe every tenant's
use of the farm, like the dashboard), with their usual bearer token; or a scraper presenting the static secret
``api.metrics_token`` when the farm owner set one (Prometheus: ``authorization: {credentials_file: ...}``), so a
scraper needs no administrator account.  Anyone else gets the API's 401/403 envelope.  The series hold no
secrets and no user names or desktop ids, but they do tell how busy the farm is, hence not open.

Also here: the count of every API request by route *template* (``/api/v1/desktops/{desktop_id}``, never the raw
path: a raw path is a new series per id) and method, called from the access log's middleware (api/access_log.py).
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from starlette.routing import BaseRoute

from deckard.api.deps import DbDep, SettingsDep, TokenDep
from deckard.runtime.metrics import API_REQUESTS, render_metrics
from deckard.services.admins import actor_for_token
from deckard.services.context import require, require_supertenant

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

router = APIRouter()


# not in the OpenAPI document: it is Prometheus' text format, not the JSON API (docs/operations.md, "Metrics")
@router.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
async def get_metrics(token: TokenDep, db: DbDep, settings: SettingsDep) -> Response:
    secret = settings.api.metrics_token
    if not (secret and hmac.compare_digest(token.encode(), secret.encode())):
        actor = await actor_for_token(db, token)
        require(actor, "stats.see")
        require_supertenant(actor, "read the farm's metrics")
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)


def route_template(request: Request) -> str:
    """The matched route's path template, whole: ``/api/v1/desktops/{desktop}`` for ``/api/v1/desktops/12``.

    FastAPI leaves the matched route in the scope with a path relative to the outer router
    (``/desktops/{desktop}``); the routers' prefixes are fixed strings, so the request's leading segments are that
    prefix.  A template whose segments cannot be lined up (a ``{name:path}`` parameter) keeps the relative template:
    bounded either way.
    """
    route = request.scope.get("route")
    relative = getattr(route, "path", None) if isinstance(route, BaseRoute) else None
    if not isinstance(relative, str):
        mount = request.scope.get("root_path", "")  # a Mount (static files) leaves its prefix there, no route
        return f"{mount}/{{path}}" if mount else "unmatched"
    raw = [p for p in request.url.path.split("/") if p]
    tail = [p for p in relative.split("/") if p]
    if ":path}" in relative or len(tail) > len(raw):
        return relative
    return "/" + "/".join(raw[: len(raw) - len(tail)] + tail)


def count_request(request: Request, status: int) -> None:
    """One request in ``deckard_api_requests_total``, labelled by its route template (or ``unmatched``)."""
    method = request.method if request.method in METHODS else "other"
    API_REQUESTS.labels(route_template(request), method, str(status)).inc()


def install_metrics(app: FastAPI) -> None:
    app.include_router(router)
