"""The one error hierarchy of Deckard.

::

    DeckardError                 code            HTTP (mapped only by api/ and broker/)
     ├── BadInput                bad_input       400 / 422
     ├── Unauthenticated         unauthenticated 401
     ├── PermissionDenied        forbidden       403
     ├── NotFound                not_found       404
     ├── Conflict                conflict        409
     │    └── InvalidTransition  invalid_transition
     ├── Unavailable             unavailable     503 (retryable)
     └── DriverError             driver_error    500 on the node; becomes a desktop's failure reason

Each error carries a stable ``code`` (a subclass may refine it, e.g. ``desktop_running``) and a message
that says what was wrong and what to do about it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class DeckardError(Exception):
    code = "error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class BadInput(DeckardError):
    code = "bad_input"
    status = 422


class Unauthenticated(DeckardError):
    code = "unauthenticated"
    status = 401


class PermissionDenied(DeckardError):
    code = "forbidden"
    status = 403


class NotFound(DeckardError):
    code = "not_found"
    status = 404


class Conflict(DeckardError):
    code = "conflict"
    status = 409


class InvalidTransition(Conflict):
    code = "invalid_transition"


class Unavailable(DeckardError):
    code = "unavailable"
    status = 503


class DriverError(DeckardError):
    code = "driver_error"
    status = 500


_BY_STATUS: dict[int, type[DeckardError]] = {
    400: BadInput,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    422: BadInput,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def reason_of(e: BaseException) -> str:
    """What a failure says to an administrator: a DeckardError's message, else the exception's type and text."""
    return e.message if isinstance(e, DeckardError) else f"{type(e).__name__}: {e}"


def error_class_for_status(status: int) -> type[DeckardError]:
    """The error a client raises for an HTTP status from the API or the broker (the inverse of ``.status``)."""
    return _BY_STATUS.get(status, DeckardError)


def pick(table: Mapping[str, T], name: str, what: str, code: str) -> T:
    """``table[name]``, or BadInput with ``code`` naming every choice (for names an administrator types)."""
    try:
        return table[name]
    except KeyError:
        raise BadInput(f"unknown {what} {name!r}; choose one of: {', '.join(sorted(table))}", code=code) from None
