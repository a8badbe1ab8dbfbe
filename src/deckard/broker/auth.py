"""Credentials from a QVD client's ``Authorization`` header, before anything touches the database.

QVD's clients send ``Basic base64(login:password)`` or, with ``--token``, ``Bearer base64(token)``
(``reference/qvd.md`` §1).  Parsing is kept apart from checking so that every malformed header gets the
same 401 as a wrong password, and so that it can be tested without a server.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from deckard.model.errors import Unauthenticated

REALM_CHALLENGE = 'Basic realm="QVD"'  # what QVD's client expects with every 401
AUTH_PARAM_PREFIX = "auth-"  # QVD: ``Auth-<hex(name)>: base64(value)`` headers carry what plugins ask for
MAX_AUTH_PARAMS = 8


@dataclass(frozen=True)
class Basic:
    login: str  # as typed: ``user``, ``user@tenant`` or ``user#tenant``
    password: str

    def __repr__(self) -> str:  # never print a password into a log line
        return f"Basic(login={self.login!r})"


@dataclass(frozen=True)
class Bearer:
    token: str

    def __repr__(self) -> str:
        return "Bearer(***)"


Credentials = Basic | Bearer


def _b64(value: str) -> str:
    try:
        return base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Unauthenticated("the Authorization header is not valid base64", code="bad_authorization") from None


def parse_authorization(header: str | bytes | None) -> Credentials:
    """``Authorization`` value → credentials; Unauthenticated when missing or malformed."""
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    if not header or not header.strip():
        raise Unauthenticated("log in with a user name and password", code="no_credentials")
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        login, sep, password = _b64(value).partition(":")
        if not sep or not login:
            raise Unauthenticated("the Basic credentials must be login:password", code="bad_authorization")
        return Basic(login, password)
    if scheme == "bearer":
        token = _b64(value)
        if not token:
            raise Unauthenticated("the Bearer token is empty", code="bad_authorization")
        return Bearer(token)
    raise Unauthenticated(f"unsupported authentication scheme {scheme!r}: use Basic", code="bad_authorization")


def auth_params(headers: dict[str, str]) -> dict[str, str]:
    """QVD's extra login parameters: ``Auth-746f7470: base64("123456")`` → ``{"totp": "123456"}``.  Headers whose
    name or value does not decode are ignored (the login then lacks that parameter and says what is missing)."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        if not name.startswith(AUTH_PARAM_PREFIX) or len(out) >= MAX_AUTH_PARAMS:
            continue
        try:
            key = bytes.fromhex(name[len(AUTH_PARAM_PREFIX) :]).decode("utf-8").lower()
            out[key] = base64.b64decode(value.strip(), validate=True).decode("utf-8")[:256]
        except (ValueError, UnicodeDecodeError, binascii.Error):
            continue
    return out
