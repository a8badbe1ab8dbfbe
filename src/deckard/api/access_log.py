"""One canonical log line per API request (CONVENTIONS.md: logging), with a request id the client sees.

The id is returned as ``X-Request-Id`` so an administrator can quote it and an operator can find the line.
Health checks log at debug level: load balancers poll them every few seconds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from fastapi import FastAPI, Request, Response

from deckard.api.metrics import count_request

log = structlog.get_logger("deckard.api")


def install_access_log(app: FastAPI) -> None:
    @app.middleware("http")
    async def access_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request_id = request.headers.get("x-request-id", "")[:64] or uuid.uuid4().hex[:16]
        request.state.request_id = request_id
        started = time.perf_counter()
        status = 500  # what the client gets if the route raises past every handler
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers["X-Request-Id"] = request_id
            return response
        finally:
            count_request(request, status)
            emit = log.debug if request.url.path.endswith("/health") else log.info
            emit(
                "api.request",
                request_id=request_id,
                method=request.method,
                path=request.url.path,
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 1),
                admin=getattr(request.state, "admin", None),
            )
