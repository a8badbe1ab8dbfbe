"""The API reference page (``/api/v1/docs``): Swagger UI served from this server, not from a CDN.

FastAPI's default page loads Swagger UI from a CDN without subresource integrity and starts it with an inline
script; both are what the Content-Security-Policy (``api/headers.py``) forbids.  The assets come from npm
``swagger-ui-dist``, bundled by ``web/`` (``web/src/docs.js`` → ``/static/dist/docs.js``); the page below is a
static shell whose only script is that bundle, which reads the document's URL from ``data-openapi``.
ReDoc is off (``redoc_url=None``).
"""

from __future__ import annotations

from html import escape

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from deckard.web import DIST


def docs_page(title: str, openapi_url: str) -> str:
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)} — reference</title>\n"
        '<link rel="stylesheet" href="/static/dist/docs.css">\n</head>\n'
        f'<body data-openapi="{escape(openapi_url)}">\n<div id="swagger-ui"></div>\n'
        '<script src="/static/dist/docs.js"></script>\n</body>\n</html>\n'
    )


def install_docs(app: FastAPI, docs_url: str) -> None:
    """Serve the reference page at ``docs_url`` (create the app with ``docs_url=None``)."""
    openapi_url = app.openapi_url or ""

    @app.get(docs_url, include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        if not (DIST / "docs.js").exists():
            return HTMLResponse("<!doctype html><title>Deckard</title><p>The web assets are not built.", 503)
        return HTMLResponse(docs_page(app.title, openapi_url), headers={"Cache-Control": "no-cache"})
