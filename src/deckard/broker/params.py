"""Query parameters of ``connect_to_vm`` and ``stop_vm``, checked the way QVD's L7R checks them.

QVD accepts ``id`` plus parameters named ``qvd.client.*`` (the client's settings: geometry, keyboard, ...)
and ``custom.*``; anything else is refused with 403 so a client cannot smuggle settings that only an
administrator may set.  A missing ``id`` is 422.  Only ``qvd.client.geometry`` changes what Deckard does
(it sizes the display); the rest is kept for the agent and for the logs.

Ids are ASCII digits within a signed 64-bit integer: ``str.isdigit`` would let ``²`` (which ``int`` refuses)
and full-width digits (U+FF11, which ``int`` reads as 1) through, and a larger number overflows the database's
INTEGER.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from deckard.model.errors import BadInput, PermissionDenied

ALLOWED_PARAM = re.compile(r"^(qvd\.client\.|custom\.)")
GEOMETRY = re.compile(r"^[1-9][0-9]{1,4}x[1-9][0-9]{1,4}$")
ASCII_DIGITS = re.compile(r"[0-9]{1,19}")  # no sign, no spaces, no other script's digits
INT64_MAX = 2**63 - 1


def parse_id(raw: str) -> int | None:
    """A positive id written in ASCII digits within int64, or None (QVD ids are database keys)."""
    if not ASCII_DIGITS.fullmatch(raw):
        return None
    value = int(raw)
    return value if 0 < value <= INT64_MAX else None


@dataclass(frozen=True)
class ConnectParams:
    desktop_id: int
    client: dict[str, str] = field(default_factory=dict)  # every qvd.client.* and custom.* pair, as sent

    @property
    def geometry(self) -> str | None:
        return self.client.get("qvd.client.geometry") or None


def parse_desktop_id(pairs: list[tuple[str, str]]) -> int:
    """The ``id`` parameter: 422 when missing or not a positive integer."""
    values = [v for k, v in pairs if k == "id"]
    if not values or not values[0].strip(" \t"):
        raise BadInput("the request has no desktop id: add ?id=N (see list_of_vm)", code="missing_id")
    if len(values) > 1:
        raise BadInput("the desktop id is given more than once", code="bad_id")
    raw = values[0].strip(" \t")
    value = parse_id(raw)
    if value is None:
        shown = raw if len(raw) <= 40 else raw[:40] + "…"
        raise BadInput(f"the desktop id {shown!r} is not a positive integer of at most 19 digits", code="bad_id")
    return value


def parse_connect_params(pairs: list[tuple[str, str]]) -> ConnectParams:
    """Check the query of a connect (order as QVD: id 422 first, then unknown names 403, then values)."""
    desktop_id = parse_desktop_id(pairs)
    client: dict[str, str] = {}
    for key, value in pairs:
        if key == "id":
            continue
        if not ALLOWED_PARAM.match(key):
            raise PermissionDenied(
                f"parameter {key!r} is not allowed: only id, qvd.client.* and custom.* may be sent",
                code="forbidden_parameter",
            )
        client[key] = value
    geometry = client.get("qvd.client.geometry")
    if geometry and not GEOMETRY.match(geometry):
        raise BadInput(f"qvd.client.geometry {geometry!r} must look like 1024x768", code="bad_geometry")
    return ConnectParams(desktop_id, client)
