"""The browser side of Deckard: the web admin tool (WAT) at ``/admin`` and the user portal at ``/``.

Pages are static HTML shells in ``pages/``; their scripts and styles are bundled from npm packages at build time
(``web/`` at the repository root → ``static/dist``) so nothing is fetched from a CDN at run time.  They talk
only to the REST API (and, for the desktop itself, to the broker's WebSocket).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

HERE = Path(__file__).parent
PAGES = HERE / "pages"
DIST = HERE / "static" / "dist"

MISSING = (
    "<!doctype html><title>Deckard</title><p>The web assets are not built: run <code>make up</code> "
    "(or <code>cd web && npm ci && npm run build</code>).</p>"
)


def _page(name: str) -> Response:
    path = PAGES / name
    if not path.exists() or not DIST.exists():
        return HTMLResponse(MISSING, status_code=503)
    return FileResponse(path, media_type="text/html", headers={"Cache-Control": "no-cache"})


def mount_web(app: FastAPI) -> None:
    DIST.mkdir(parents=True, exist_ok=True)
    app.mount("/static/dist", StaticFiles(directory=DIST), name="dist")

    @app.get("/", include_in_schema=False)
    async def portal() -> Response:
        return _page("portal.html")

    @app.get("/admin", include_in_schema=False)
    @app.get("/admin/", include_in_schema=False)
    async def admin() -> Response:
        return _page("admin.html")

    @app.get("/admin/spy", include_in_schema=False)
    async def spy() -> Response:
        return _page("spy.html")
