"""The admin REST API (QVD's qvd-api): one FastAPI app, all routes under ``/api/v1``, one module per resource.

The app holds no state of its own: the ``Database`` and ``Settings`` it is given live on ``app.state`` and
reach routes through ``api/deps.py``.  The caller starts and closes the database (lifespan is off), so the
lead process can share one ``Database`` between the API and the node daemon.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from starlette.types import ASGIApp

import deckard
from deckard.api.access_log import install_access_log
from deckard.api.audit_log import install_audit_log
from deckard.api.docs import install_docs
from deckard.api.errors import install_error_handlers
from deckard.api.headers import SecurityHeaders
from deckard.api.limits import BodyLimit, BodyLimitRule
from deckard.api.metrics import install_metrics
from deckard.api.routes import (
    admins,
    audit,
    auth,
    config,
    connections,
    desktops,
    events,
    farm,
    health,
    identity,
    images,
    networks,
    nodes,
    osfs,
    pools,
    portal,
    portal_account,
    properties,
    roles,
    sso,
    stats,
    tenants,
    users,
    volumes,
)
from deckard.api.routes.portal import BrokerOrigins
from deckard.api.strict import check_path_refs
from deckard.db.engine import Database
from deckard.runtime.settings import Settings
from deckard.web import mount_web

PREFIX = "/api/v1"
UPLOAD_PATH = rf"{PREFIX}/images/[^/]+/content$"  # PUT: a disk image's tarball, streamed to disk


class DeckardApp(FastAPI):
    """FastAPI with the request front (``api/headers.py``, ``api/limits.py``) outside everything else.

    ``add_middleware`` would put them inside Starlette's error middleware, whose 500 answers would then leave
    without security headers; wrapping the built stack keeps them first in and last out.
    """

    def build_middleware_stack(self) -> ASGIApp:
        settings: Settings = self.state.settings
        limited = BodyLimit(
            super().build_middleware_stack(),
            settings.api.max_body_bytes,
            [BodyLimitRule(UPLOAD_PATH, settings.api.max_upload_bytes)],
            max_header_bytes=settings.api.max_header_bytes,
        )
        return SecurityHeaders(limited, BrokerOrigins(self.state.db, settings))


def create_app(db: Database, settings: Settings) -> FastAPI:
    app = DeckardApp(
        title="Deckard admin API",
        version=deckard.__version__,
        description=(
            "Administer a Deckard farm: users, desktops, nodes, images.  Authenticate with "
            "`POST /api/v1/auth/login` and send `Authorization: Bearer <token>`.  "
            "Errors always have the shape "
            '`{"error": {"code", "message", "details"?}}` with a stable `code`.'
        ),
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=None,  # our own page: api/docs.py
        redoc_url=None,
        dependencies=[Depends(check_path_refs)],  # every path id, every route (api/strict.py)
    )
    app.state.db = db
    app.state.settings = settings
    install_error_handlers(app)
    install_docs(app, f"{PREFIX}/docs")
    install_access_log(app)
    install_audit_log(app)
    modules = (health, auth, tenants, admins, roles, users, osfs, images, desktops, nodes, config, properties)
    for module in (*modules, identity, farm, audit, connections, stats, events, volumes, networks, pools):
        # Each router straight into the app with its prefix: FastAPI (0.165) checks every route of a router
        # included with no prefix by building its whole context (pydantic adapters and all), which an
        # ``APIRouter(prefix=PREFIX)`` in between made it do twice more per app (0.3 s of each create_app).
        app.include_router(module.router, prefix=PREFIX)
    app.include_router(portal.router)  # /portal/* and /api/v1/desktops/{id}/spy-ticket
    app.include_router(portal_account.router)  # /portal/me/*
    app.include_router(sso.router)  # /portal/sso/*, /admin/sso/*
    install_metrics(app)  # /metrics: Prometheus (api/metrics.py)
    mount_web(app)
    return app
