"""The shapes every response shares, so clients parse one envelope whatever the resource.

* one object: the object itself (``GET /desktops/7`` → ``{"id": 7, ...}``);
* a list: ``{"items": [...], "total": N}`` (``model/schemas.py``'s ``Page``: ``total`` counts every match);
* an error, with its HTTP status:
  ``{"error": {"code": "desktop_not_found", "message": "...", "details"?: {}}}``.

Error codes are stable: clients and scripts branch on ``code``, never on ``message``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `desktop_running`.")
    message: str = Field(description="What was wrong and what to do about it.")
    details: dict[str, Any] | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


# documented on every route so the OpenAPI document shows the error shape
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": text}
    for status, text in (
        (401, "Missing, invalid or expired token (`unauthenticated`, `bad_token`, `session_expired`)."),
        (403, "The administrator may not do this (`forbidden`)."),
        (404, "No such object (`*_not_found`)."),
        (409, "Conflicts with the current state (`duplicate`, `desktop_running`, ...)."),
        (422, "Invalid input (`bad_input` and refinements)."),
    )
}
