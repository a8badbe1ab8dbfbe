"""Mapping errors to HTTP: the only place (with the broker) where a ``DeckardError`` becomes a status code.

Every failure leaves the API in the one error envelope (``api/envelope.py``): Deckard's own errors with their
``status`` and ``code``, FastAPI's validation errors as 422 ``bad_input``, unknown routes and methods as
404 ``not_found`` / 405 ``method_not_allowed``, a database that went away or stayed busy as 503
``database_unavailable`` (try again), and anything unexpected as 500 ``internal`` (logged, never
leaking a traceback to the client).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy.exc
import structlog
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deckard.model.errors import DeckardError
from deckard.runtime.metrics import API_ERRORS

log = structlog.get_logger("deckard.api")

_HTTP_CODES = {401: "unauthenticated", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    API_ERRORS.labels(code).inc()
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = jsonable_encoder(details)
    return JSONResponse({"error": body}, status_code=status, headers=dict(headers) if headers else None)


async def _deckard_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DeckardError)
    # RFC 6750: a 401 for a bearer-protected resource names the scheme
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.code, exc.message, exc.details, headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", ""), "type": e.get("type")}
        for e in exc.errors()
    ]
    first = problems[0] if problems else {"where": "request", "problem": "invalid"}
    message = f"invalid input at {first['where']}: {first['problem']}"
    return error_response(422, "bad_input", message, {"errors": problems})


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = "no such API route: see /api/v1/docs" if exc.status_code == 404 else str(exc.detail)
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _data_error(_request: Request, _exc: Exception) -> JSONResponse:
    # the database refused a value the schema let through (e.g. a NUL byte in text on PostgreSQL)
    return error_response(422, "bad_input", "a value in the request cannot be stored (control characters?)")


async def _statement_error(request: Request, exc: Exception) -> JSONResponse:
    # a value the database driver cannot even bind (SQLite: an integer beyond 64 bits); the validation in
    # api/strict.py and services/listing.py stops these first, this keeps any it misses a 422 and not a 500
    if isinstance(exc, OverflowError) or isinstance(getattr(exc, "orig", None), OverflowError):
        return error_response(422, "bad_input", "a number in the request is out of range (at most 64 bits)")
    if _database_away(exc):
        log.warning("api.database_unavailable", path=request.url.path, method=request.method, error=str(exc)[:300])
        return error_response(
            503,
            "database_unavailable",
            "the farm's database did not answer in time (busy, restarting or unreachable): try again in a moment",
            headers={"Retry-After": "2"},
        )
    return await _unexpected_error(request, exc)


# SQLSTATE classes of a session the server ended or a database that is not there (not of a bad statement):
# 08 connection exception, 25P03 idle-in-transaction timeout, 53 insufficient resources, 55P03 lock not
# available (lock_timeout), 57 operator intervention (shutdown, admin terminate), 58 system error
_AWAY_STATES = ("08", "25P03", "53", "55P03", "57", "58")


def _database_away(exc: Exception) -> bool:
    """The request failed because the database went away or stayed busy, not because of what it asked."""
    if not isinstance(exc, sqlalchemy.exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    state = str(getattr(exc.orig, "sqlstate", None) or "")
    if state.startswith(_AWAY_STATES):
        return True
    # SQLite: a writer that waited out its busy timeout
    return isinstance(exc, sqlalchemy.exc.OperationalError) and "database is locked" in str(exc.orig)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("api.unexpected_error", path=request.url.path, method=request.method, exc_info=exc)
    return error_response(500, "internal", "internal error: the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DeckardError, _deckard_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(sqlalchemy.exc.DataError, _data_error)
    app.add_exception_handler(sqlalchemy.exc.StatementError, _statement_error)
    app.add_exception_handler(OverflowError, _statement_error)
    app.add_exception_handler(Exception, _unexpected_error)
